"""Two floors behind docs/benchmarks.md's account of issue 37's 3x targets, on this machine:

* weights: the weight products of one greedy decode step of bench_generate's 4-layer, 256-wide shape
  (per layer q, k, v, o, gate, up, down; then the 8192-row head; batch 4; 21 MB of float32), chained
  as in a step and run 64 times in one jitted loop: the step's cost with nothing but its products;
* torch_training: the training part of TRL's step at bench_vs_trl's default `--new 32` shape, in torch
  alone: the teacher's forward, the student's forward and backward with the full-vocabulary forward
  KL, gradient clipping and AdamW, on [48, 48] rows (the demo's student and teacher shapes, random).

    python scripts/experiments/speed_floors.py      # one CPU device, nothing else running
"""

from __future__ import annotations

from decode_step import best  # ms, best of `repeats` after a warm-up call


def weights_floor():
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.RandomState(0)
    shapes = [(256, 256), (256, 128), (256, 128), (256, 256), (256, 768), (256, 768), (768, 256)]
    layers = [[jnp.asarray(rng.randn(*s).astype(np.float32) * 0.01) for s in shapes] for _ in range(4)]
    head = jnp.asarray(rng.randn(256, 8192).astype(np.float32) * 0.01)

    @jax.jit
    def steps(x, layers, head):
        def body(i, c):
            h, acc = c
            for wq, wk, wv, wo, wg, wu, wd in layers:
                h = h + (h @ wq + jnp.concatenate([h @ wk, h @ wv], -1)) @ wo
                h = h + (jax.nn.silu(h @ wg) * (h @ wu)) @ wd
            return h * 0.5, acc + (h @ head)[:, :4].sum()
        return jax.lax.fori_loop(0, 64, body, (x, jnp.zeros(())))[1]

    x = jnp.ones((4, 256))
    sec = best(lambda: steps(x, layers, head).block_until_ready(), 7) / 64e3
    mb = (sum(a * b for a, b in shapes) * 4 + 256 * 8192) * 4 / 1e6
    print(f"weights: {sec * 1e3:.3f} ms a decode step's products ({mb:.1f} MB, {mb / 1e3 / sec:.1f} GB/s)")


def torch_training():
    import torch
    import transformers

    from opd_jax.demo import STUDENT, TEACHER

    torch.manual_seed(0)

    def make(s):
        return transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(
            vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
            num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
            num_key_value_heads=s["num_kv_heads"], head_dim=s["head_dim"], max_position_embeddings=64))

    student, teacher = make(STUDENT), make(TEACHER)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(3, 64, (48, 48))
    mask = torch.ones_like(ids)

    def step():
        with torch.no_grad():
            t = torch.log_softmax(teacher(ids, attention_mask=mask).logits[:, 15:-1], -1)
        s = torch.log_softmax(student(ids, attention_mask=mask).logits[:, 15:-1], -1)
        (t.exp() * (t - s)).sum(-1).mean().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    print(f"torch_training: {best(step, 7):.1f} ms (teacher forward, student forward and backward, AdamW; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    weights_floor()
    torch_training()
