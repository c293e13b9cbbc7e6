"""Rollout time of `opd_jax.generate` at three shapes, for before/after comparisons of engine changes
(no peer: the peers' side by side runs are scripts/bench_generate.py, bench_vs_trl.py, bench_rollouts.py).

* small: the 4-layer, 256-wide Qwen3 shape of bench_generate's issue-37 line (vocab 8192), batch 4,
  prompt 32, 64 new tokens, greedy: ms per call and per decode step, and a call with one new token;
* opd: the bench_vs_trl student (the demo's 2-layer, 80-wide student, vocab 64), 48 rows, prompt 16,
  32 new tokens, temperature 1 and greedy: ms per rollout;
* real: SmolLM2-135M-Instruct (scripts/get_smollm2.sh; skipped when absent), batch 8, prompt 40,
  48 sampled tokens: ms per decode step, (t(48) - t(1)) / 47.

Random weights except SmolLM2's; best of --repeats after a warm-up call; one CPU device, run it alone.

    python scripts/experiments/decode_step.py [--repeats 10] [--only small,opd,real]
    taskset -c 0 python scripts/experiments/decode_step.py   # the same on one core
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def best(fn, repeats):
    """Milliseconds: the best of `repeats` timed calls of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--only", default="small,opd,real")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import opd_jax
    from opd_jax.demo import STUDENT
    from opd_jax.models import ModelConfig, init_model

    only = set(args.only.split(","))

    def gen(model, b, p, n, temp, vocab):
        rng = np.random.RandomState(0)
        ids, mask = jnp.asarray(rng.randint(3, vocab, (b, p))), jnp.ones((b, p), jnp.int32)
        return lambda: opd_jax.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=n,
                                        temperature=temp).tokens.block_until_ready()

    print(f"opd_jax {Path(opd_jax.__file__).parent}, jax {jax.__version__}, {os.cpu_count()} cores")
    if "small" in only:
        cfg = ModelConfig.for_family("qwen3", vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4,
                                     num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=4096)
        small = init_model(cfg, 0)
        ms, one = (best(gen(small, 4, 32, n, 0.0, 8192), args.repeats) for n in (64, 1))
        print(f"small: {ms:.1f} ms a call, {ms / 64:.3f} ms a decode step (greedy); {one:.1f} ms a call with "
              "one new token (prefill and fixed costs)")
    if "opd" in only:
        m = init_model(ModelConfig(**STUDENT, qk_norm=True), 0)
        for temp in (1.0, 0.0):
            print(f"opd: temperature {temp}: {best(gen(m, 48, 16, 32, temp, 64), args.repeats):.2f} ms a rollout")
    model_dir = Path(os.environ.get("OPD_JAX_CACHE", Path.home() / ".cache/opd_jax")) / "models/smollm2-135m-instruct"
    if "real" in only and (model_dir / "model.safetensors").exists():
        m = opd_jax.load_model(model_dir)
        one, full = (best(gen(m, 8, 40, n, 1.0, 40000), max(2, args.repeats // 3)) for n in (1, 48))
        print(f"real: SmolLM2-135M-Instruct, 8 rows: {(full - one) / 47:.1f} ms a decode step (sampled)")


if __name__ == "__main__":
    main()
