"""The update on padded rows against the same sequences packed (`opd_jax.packing`), in one run.

A step's sequences: prompts of --prompt tokens (their real lengths uniform in [prompt/2, prompt]) and
completions with long-tailed lengths (log-normal with the given median and 99th percentile, cut at
--cap). Padded: rows [rows, prompt + cap], as the trainer compiles them (data.max_new_tokens = cap; with
--pad-to-longest, rows end at the step's longest completion).
Packed: the same sequences laid end to end by first-fit decreasing into rows of --pack-tokens (default
prompt + cap). Each side runs, as one compiled program, the teacher's forward (its final hidden states,
no gradient) and the student's full-vocabulary forward KL against them, forward and backward
(`train_step.policy_loss`, estimator "full", chunked over positions). Both use blockwise attention.
Timings are the best of --repeats after one warm-up call, on whatever devices JAX sees (run it alone,
with one CPU device: `JAX_PLATFORMS=cpu python scripts/bench_packing.py ...`).

    python scripts/bench_packing.py --median 64 --p99 512 --cap 768 --rows 64
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.batch import Part
from opd_jax.config import LossConfig
from opd_jax.models import ModelConfig, init_model
from opd_jax.models.transformer import with_runtime
from opd_jax.packing import lognormal_lengths, packed_part
from opd_jax.train_step import policy_loss


def sequences(args, rng):
    """Left-padded prompts [rows, P] and right-padded completions [rows, cap] with their masks."""
    comp = lognormal_lengths(args.median, args.p99, args.rows, args.cap, rng)
    prompt = rng.randint(args.prompt // 2, args.prompt + 1, args.rows)
    P, N = args.prompt, args.cap
    pmask = (np.arange(P)[None] >= P - prompt[:, None]).astype(np.int32)
    mask = (np.arange(N)[None] < comp[:, None]).astype(np.int32)
    tokens = rng.randint(3, args.vocab, (args.rows, P + N)).astype(np.int32)
    tokens[:, :P] *= pmask
    tokens[:, P:] *= mask
    return tokens, pmask, mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--median", type=int, default=64)
    ap.add_argument("--p99", type=int, default=512)
    ap.add_argument("--cap", type=int, default=768)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--pack-tokens", type=int, default=0, help="0: prompt + cap")
    ap.add_argument("--pad-to-longest", action="store_true",
                    help="padded rows end at the step's longest completion, not at --cap (a horizon bucket's best case)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--block", type=int, default=128, help="blockwise attention block")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=4 * args.width,
                      num_layers=args.layers, num_heads=max(1, args.width // 64), num_kv_heads=max(1, args.width // 128),
                      head_dim=64, max_position_embeddings=args.prompt + args.cap)
    rt = dict(attention="blockwise", attention_block=args.block)
    student, teacher = with_runtime(init_model(cfg, 0), **rt), with_runtime(init_model(cfg, 1), **rt)
    graphdef, params = nnx.split(student)
    t_graphdef, t_params = nnx.split(teacher)
    lc = LossConfig(estimator_type="full", kind="forward_kl")
    P = args.prompt

    tokens, pmask, mask = sequences(args, np.random.RandomState(args.seed))
    if args.pad_to_longest:
        n = int(mask.sum(1).max())
        tokens, mask = tokens[:, :P + n], mask[:, :n]
    padded = Part(*(jnp.asarray(x) for x in (tokens, pmask, mask)))
    host, fraction, _ = packed_part(Part(tokens, pmask, mask), args.pack_tokens or P + args.cap)
    packed = jax.tree.map(jnp.asarray, host)

    def step(params, t_params, b):
        t = nnx.merge(t_graphdef, t_params)
        if b.packed:
            th = t.packed_hidden(b.tokens, b.segments)[:, :-1]
        else:
            th = t.completion_hidden(b.tokens, jnp.concatenate([b.prompt_mask, b.mask], 1), P)
        th, tw = jax.lax.stop_gradient(th), jax.lax.stop_gradient(t.output_matrix())

        def loss(p):
            return policy_loss(nnx.merge(graphdef, p), b, lc, P, 1, 1.0, teacher=th, teacher_w=tw)[0]
        return jax.value_and_grad(loss)(params)

    fn = jax.jit(step)
    real = int(pmask.sum() + mask.sum())
    ms = {}
    for name, b in (("padded", padded), ("packed", packed)):
        jax.block_until_ready(fn(params, t_params, b))  # compile + warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            loss, g = fn(params, t_params, b)
            jax.block_until_ready(g)
            best = min(best, time.perf_counter() - t0)
        ms[name] = best * 1e3
        print(f"{name}: rows {b.tokens.shape[0]} x {b.tokens.shape[1]} tokens, loss {float(loss):.6f}, "
              f"{ms[name]:.1f} ms a step", flush=True)
    comp = mask.sum(1)
    print(f"sequences: {args.rows}, completion median {np.median(comp):.0f}, p99 {np.percentile(comp, 99):.0f}, "
          f"max {comp.max()}; real tokens {real}; model {args.layers} x {args.width}, vocab {args.vocab}; "
          f"{jax.device_count()} {jax.default_backend()} device(s)")
    print(f"real-token fraction: padded {real / tokens.size:.2f}, packed {fraction:.2f}")
    per = {k: v / (real / 1000) for k, v in ms.items()}
    print(f"update ms per 1k real tokens: padded {per['padded']:.1f}, packed {per['packed']:.1f}, "
          f"ratio {per['padded'] / per['packed']:.2f}x")


if __name__ == "__main__":
    main()
