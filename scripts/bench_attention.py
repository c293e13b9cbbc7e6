"""Blockwise (flash-style) attention against the plain path: CPU time of forward + backward at a short
length where both fit, and the ratio, in one run on one device.

    python scripts/bench_attention.py [--t 512] [--heads 8] [--kv 2] [--dim 64] [--batch 4] [--block 512]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.models.attention import blockwise_attention, naive_attention


def timed(fn, *args, reps=5):
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--t", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block", type=int, default=512)
    a = ap.parse_args(argv)
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.normal(size=(a.batch, a.t, a.heads, a.dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(a.batch, a.t, a.kv, a.dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(a.batch, a.t, a.kv, a.dim)), jnp.float32)
    slots, valid = jnp.arange(a.t), jnp.ones((a.batch, a.t), bool)

    def step(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, slots, valid) ** 2), argnums=(0, 1, 2)))

    naive = timed(step(naive_attention), q, k, v)
    block = timed(step(lambda *x: blockwise_attention(*x, block_q=a.block, block_k=a.block)), q, k, v)
    print(f"T={a.t} B={a.batch} H={a.heads} K={a.kv} Dh={a.dim} block={a.block} ({jax.devices()[0].platform})")
    print(f"naive     {naive * 1e3:8.2f} ms (forward + backward)")
    print(f"blockwise {block * 1e3:8.2f} ms")
    print(f"ratio blockwise / naive: {block / naive:.2f}x")


if __name__ == "__main__":
    main()
