"""Greedy generation throughput: opd_jax vs transformers (torch) `generate`, same model, same run.

Builds one random Qwen3-shaped model with transformers, saves it as safetensors, loads it into
opd_jax, checks both produce the same tokens, then times each (after one warm-up call) and prints
tokens/s and the ratio (best of --repeats runs of each, interleaved). Compile time of opd_jax is reported separately.

    python scripts/bench_generate.py [--layers 8 --width 512 --vocab 32000 --batch 8 --prompt 64 --new 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention", default="auto", help="opd_jax attention: auto (decode reads the filled cache) "
                    "or naive (every cache slot, the previous behaviour)")
    ap.add_argument("--model", default=None, help="a converted checkpoint folder (e.g. SmolLM2-135M-Instruct from "
                    "scripts/get_smollm2.sh) instead of a random Qwen3-shaped model; --layers/--width/--vocab are ignored")
    args = ap.parse_args()

    import torch
    import transformers
    import jax
    import jax.numpy as jnp
    import opd_jax
    from opd_jax.models.transformer import with_runtime

    torch.manual_seed(0)
    if args.model:
        tm = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        args.layers, args.width, args.vocab = (tm.config.num_hidden_layers, tm.config.hidden_size,
                                               tm.config.vocab_size)
    heads = args.width // 64
    cfg = None if args.model else transformers.Qwen3Config(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=3 * args.width,
                                   num_hidden_layers=args.layers, num_attention_heads=heads,
                                   num_key_value_heads=max(1, heads // 2), head_dim=64,
                                   max_position_embeddings=4096, eos_token_id=None, bos_token_id=None)
    if cfg is not None:
        tm = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for p in tm.parameters():
                p.normal_(0, 0.05) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, args.vocab, (args.batch, args.prompt))
    mask = np.ones_like(ids)
    for r in range(args.batch):  # left padding, as in real batches
        mask[r, : rng.randint(0, args.prompt // 4)] = 0
    ids = np.where(mask == 1, ids, 0)
    if args.model:
        jm = with_runtime(opd_jax.load_model(args.model), attention=args.attention)
    else:
        with tempfile.TemporaryDirectory() as d:
            tm.save_pretrained(d)
            jm = with_runtime(opd_jax.load_model(d), attention=args.attention)

    def run_torch():
        with torch.no_grad():
            return tm.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                               max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0).numpy()

    jids, jmask = jnp.asarray(ids), jnp.asarray(mask)

    def run_jax():
        roll = opd_jax.generate(jm, jids, jmask, key=jax.random.key(0), max_new_tokens=args.new, temperature=0.0)
        return np.asarray(jax.block_until_ready(roll.tokens))

    t0 = time.perf_counter()
    out_j = run_jax()
    compile_s = time.perf_counter() - t0
    out_t = run_torch()
    agree = float((out_j[:, args.prompt:] == out_t[:, args.prompt:]).mean())

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    # interleaved (jax, torch, jax, torch, ...), best of each: a slow spell of this shared machine
    # then falls on both sides instead of on whichever ran during it
    pairs = [(timed(run_jax), timed(run_torch)) for _ in range(args.repeats)]
    tj, tt = min(p[0] for p in pairs), min(p[1] for p in pairs)
    n = args.batch * args.new
    print(f"host: {os.cpu_count()} cores, jax on {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}, "
          f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: {args.model or 'random qwen3'} layers={args.layers} width={args.width} vocab={args.vocab}; batch={args.batch} "
          f"prompt={args.prompt} new={args.new} greedy float32; opd_jax attention={args.attention}")
    print(f"opd_jax per decode step: {tj / args.new * 1e3:.3f} ms")
    print(f"token agreement opd_jax vs torch: {agree:.4f}")
    print(f"opd_jax first call (compile + run): {compile_s:.2f} s")
    print(f"opd_jax:      {n / tj:9.1f} tokens/s  ({tj:.3f} s)")
    print(f"transformers: {n / tt:9.1f} tokens/s  ({tt:.3f} s)")
    print(f"ratio opd_jax / transformers: {tt / tj:.2f}x")


if __name__ == "__main__":
    main()
