"""Memory and time of the full-vocabulary divergence + gradient: chunked vs naive full logits.

Memory: compile-time `memory_analysis()` temporary bytes of loss + gradient (nothing is allocated),
at B=4, T=2048, V=151,936, hidden 1024, bfloat16 hidden states and output matrices, for the student
and a teacher of the same shape. Time: both run for real on a smaller shape (best of 5).

    python scripts/bench_loss_memory.py [--kind reverse_kl] [--seq-chunk 128] [--vocab-chunk 0]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import losses as L


def make_fns(kind, seq_chunk, vocab_chunk):
    def naive(hs, ws, ht, wt, mask):
        s = jnp.einsum("btd,dv->btv", hs, ws, preferred_element_type=jnp.float32)
        t = jnp.einsum("btd,dv->btv", ht, wt, preferred_element_type=jnp.float32)
        return L.full_vocab_loss(s, t, mask, kind)[0]

    def chunked(hs, ws, ht, wt, mask):
        return L.chunked_divergence_loss(hs, ws, mask, kind, teacher_hidden=ht, teacher_w=wt, seq_chunk=seq_chunk,
                                         vocab_chunk=vocab_chunk or None)[0]

    return naive, chunked


def shapes(b, t, d, v, dtype):
    h = jax.ShapeDtypeStruct((b, t, d), dtype)
    w = jax.ShapeDtypeStruct((d, v), dtype)
    return h, w, h, w, jax.ShapeDtypeStruct((b, t), jnp.int32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="reverse_kl")
    ap.add_argument("--seq-chunk", type=int, default=128)
    ap.add_argument("--vocab-chunk", type=int, default=0, help="0: whole vocabulary per sequence chunk")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936)
    args = ap.parse_args()
    naive, chunked = make_fns(args.kind, args.seq_chunk, args.vocab_chunk)
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    big = shapes(args.batch, args.seq, args.hidden, args.vocab, jnp.bfloat16)
    mem = {}
    for name, fn in (("naive", naive), ("chunked", chunked)):
        mem[name] = grad(fn).lower(*big).compile().memory_analysis().temp_size_in_bytes
    print(f"shape B={args.batch} T={args.seq} hidden={args.hidden} V={args.vocab} bf16, kind={args.kind}, "
          f"seq_chunk={args.seq_chunk}, vocab_chunk={args.vocab_chunk or 'all'}")
    print(f"temporary bytes, loss+grad: naive {mem['naive'] / 2**30:.2f} GiB, chunked {mem['chunked'] / 2**30:.3f} GiB, "
          f"ratio chunked/naive {mem['chunked'] / mem['naive']:.4f} (1/{mem['naive'] / mem['chunked']:.1f})")

    b, t, d, v = 2, 512, 256, 32000
    rng = np.random.RandomState(0)
    args_small = (jnp.asarray(rng.normal(size=(b, t, d)), jnp.bfloat16),
                  jnp.asarray(rng.normal(size=(d, v)) * 0.05, jnp.bfloat16),
                  jnp.asarray(rng.normal(size=(b, t, d)), jnp.bfloat16),
                  jnp.asarray(rng.normal(size=(d, v)) * 0.05, jnp.bfloat16),
                  jnp.ones((b, t), jnp.int32))
    times, vals = {}, {}
    small_chunk = min(args.seq_chunk, t // 4)
    naive_s, chunked_s = make_fns(args.kind, small_chunk, args.vocab_chunk)
    for name, fn in (("naive", naive_s), ("chunked", chunked_s)):
        f = grad(fn)
        jax.block_until_ready(f(*args_small))
        best = []
        for _ in range(5):
            t0 = time.perf_counter()
            vals[name] = jax.block_until_ready(f(*args_small))[0]
            best.append(time.perf_counter() - t0)
        times[name] = min(best)
    print(f"time, loss+grad at B={b} T={t} hidden={d} V={v} (seq_chunk={small_chunk}): naive {times['naive'] * 1e3:.1f} ms, "
          f"chunked {times['chunked'] * 1e3:.1f} ms, ratio chunked/naive {times['chunked'] / times['naive']:.2f}x; "
          f"loss naive {float(vals['naive']):.6f} chunked {float(vals['chunked']):.6f}")


if __name__ == "__main__":
    main()
