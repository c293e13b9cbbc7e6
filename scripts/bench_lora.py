"""A LoRA update against a full fine-tuning update at the same shape, in one run (`student.lora`).

Both sides are the trainer's own compiled update (`run.build_run`: the same student, teacher, batch and
optimizer; AdamW), differing only in `student.lora`. The student is a random model of SmolLM2-135M's
shape by default (30 layers, width 576, 9 heads / 3 kv heads, MLP 1536, vocabulary 49,152), its
teacher another random model of that shape, the exact forward KL over the vocabulary on one batch of
the student's own samples (both sides start from the same base: their first losses are equal). Memory is XLA's compile-time figure for the update: its arguments
(parameters, optimizer state, batch, output matrix) and its temporaries (activations, gradients).
Time is the update alone, best of --repeats after a warm-up, on one CPU device: run it alone.

    JAX_PLATFORMS=cpu python scripts/bench_lora.py --rank 16 --bf16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from opd_jax.config import load_config
from opd_jax.lora import trainable
from opd_jax.models import ModelConfig, init_model, save_model
from opd_jax.run import build_run

GiB = 2**30


def measure(args, lora: str, out: Path, teacher: Path, dtype: str = "float32") -> dict:
    shape = {"vocab_size": args.vocab, "hidden_size": args.width, "intermediate_size": args.mlp,
             "num_layers": args.layers, "num_heads": args.heads, "num_kv_heads": args.kv_heads,
             "head_dim": args.width // args.heads, "tie_word_embeddings": True}
    over = [f"student.init={json.dumps(shape)}", f"student.lora={lora}", f"student.dtype={dtype}", f"teachers=[{{name: t, path: {teacher}}}]",
            "routing={addition: t, reverse: t, sort: t}", f"data.per_domain={args.per_domain}",
            "data.group_size=1", f"data.max_new_tokens={args.new}", "data.max_prompt_len=32",
            "loss.estimator_type=full", "loss.kind=forward_kl", "optim.name=adamw", "optim.lr=1e-4",
            f"train.out_dir={out}", "train.progress=false", "train.steps=10"]
    run = build_run(load_config(None, over))
    batch = run.rollouts.collect(0, run.init)
    mem = run.update.memory()
    state = run.init
    times, losses = [], []
    for i in range(args.repeats + 1):
        t = time.perf_counter()
        state, m = run.update(state, batch.arrays, run.teacher_w)
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - t)
        losses.append(float(m["loss"]))
    n_all = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable(state.params)))
    return {"params": n_all, "trainable": n_train, "arguments": mem["compiled_argument_bytes_per_device"],
            "temporaries": mem["activation_bytes_per_device"], "ms": 1000 * min(times[1:]), "loss": losses[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--per-domain", type=int, default=4, help="prompts per domain (3 domains): rows per step")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="also a LoRA update on a bfloat16 base (memory; CPU bf16 time is not TPU's)")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp())
    teacher = save_model(init_model(ModelConfig(
        vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.mlp, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.width // args.heads, tie_word_embeddings=True),
        seed=1), out / "teacher")
    res = {"full": measure(args, "{}", out / "full", teacher),
           "lora": measure(args, f"{{rank: {args.rank}, alpha: {2 * args.rank}}}", out / "lora", teacher)}
    if args.bf16:  # the base held (and computed) in bfloat16, the adapters and their state in float32
        res["lora, bfloat16 base"] = measure(args, f"{{rank: {args.rank}, alpha: {2 * args.rank}}}", out / "bf16",
                                             teacher, "bfloat16")
    print(f"model {args.layers} x {args.width}, vocabulary {args.vocab}; {3 * args.per_domain} rows x (32 + {args.new}) "
          f"tokens; {jax.device_count()} {jax.devices()[0].platform} device(s)")
    for name, r in res.items():
        print(f"{name}: {r['trainable'] / 1e6:8.2f} M trainable of {r['params'] / 1e6:.2f} M; arguments "
              f"{r['arguments'] / GiB:.3f} GiB, temporaries {r['temporaries'] / GiB:.3f} GiB; update {r['ms']:.1f} ms; "
              f"first loss {r['loss']:.6f}")
    f, lo = res["full"], res["lora"]
    print(f"memory (arguments + temporaries): full {(f['arguments'] + f['temporaries']) / GiB:.3f} GiB, lora "
          f"{(lo['arguments'] + lo['temporaries']) / GiB:.3f} GiB, ratio "
          f"{(f['arguments'] + f['temporaries']) / (lo['arguments'] + lo['temporaries']):.2f}x")
    print(f"update time: full {f['ms']:.1f} ms, lora {lo['ms']:.1f} ms, ratio {f['ms'] / lo['ms']:.2f}x")


if __name__ == "__main__":
    main()
