"""Asynchronous (train.max_staleness 1) against synchronous OPD on the demo's task, in one run.

Both sides start from the demo's weak student and its three trained teachers (`opd_jax.demo.prepare`,
cached after the first run) and train with the demo's OPD config (exact forward KL, 16 prompts per
domain, 8 new tokens, log every 10 steps), same seed. The asynchronous side runs the sampler and the
teachers' scoring in a thread of the same process while the learner updates; XLA:CPU runs the two
sides' programs at once on the machine's cores. Timed: the wall time of steps --warmup..--steps
(compiles excluded). Also printed: the weight sync's share of a step, the teacher divergence at the
end (mean of the last 3 log steps) and greedy accuracy, and reverse KL (sampled-token estimator) at
k = 1 with and without the truncated importance weights.

    python scripts/bench_async.py --steps 200
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np


def run(cfg, steps: int, warmup: int, prep):
    from opd_jax.hooks import Logger, SkipCounter
    from opd_jax.run import build_run
    from opd_jax.train import train_loop

    run = build_run(cfg)
    recs, times = [], []

    class Clock:
        def after_step(self, ctx):
            times.append(time.perf_counter())
            if ctx.record:
                recs.append(dict(ctx.record))

    state = train_loop(run, run.init, [SkipCounter(3), Logger(run), Clock()], start=0, end=steps)
    wall = times[-1] - times[warmup - 1]
    div = [r["on_policy/divergence"] for r in recs]
    sync = [r.get("time/weight_sync", 0.0) / r["time/step"] for r in recs if "time/step" in r]
    from flax import nnx
    acc = prep["accuracy"](nnx.merge(run.graphdef, state.params))["mean"]
    return {"steps_per_s": (steps - warmup) / wall, "divergence": float(np.mean(div[-3:])),
            "weight_sync_share": float(np.mean(sync)), "accuracy": acc,
            "is_clip": float(np.mean([r.get("on_policy/is_clip_fraction", 0.0) for r in recs]))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=2, help="seeds of the reverse-KL arms")
    args = ap.parse_args()
    from opd_jax import demo
    from opd_jax.config import LossConfig

    tmp = Path(tempfile.mkdtemp())
    prep = demo.prepare(tmp / "prep", log=lambda *a: None)
    base = demo.opd_config(prep, tmp / "runs", steps=args.steps)
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, progress=False, eval_every=10 ** 6,
                                                               checkpoint_every=10 ** 6))

    def variant(name, k, lr=None, seed=0, **loss):
        lc = dataclasses.replace(base.loss, **loss) if loss else base.loss
        optim = dataclasses.replace(base.optim, lr=lr or base.optim.lr)
        return dataclasses.replace(base, loss=lc, optim=optim, train=dataclasses.replace(
            base.train, max_staleness=k, seed=seed, out_dir=str(tmp / f"{name}_{seed}")))

    # the sampled reverse-KL estimator at the demo's forward-KL rate (3e-3) collapses the student, with
    # or without staleness; 1e-3 trains it
    rev = dict(estimator_type="sampled", kind="reverse_kl", lr=1e-3)
    res = {}
    print(f"student before OPD: accuracy {prep['before']['mean']:.3f}", flush=True)
    arms = [("forward_kl sync", variant("f0", 0)), ("forward_kl async k=1", variant("f1", 1))]
    for seed in range(args.seeds):
        arms += [(f"reverse_kl sync seed {seed}", variant("r0", 0, seed=seed, **rev)),
                 (f"reverse_kl async k=1 IS cap 2 seed {seed}", variant("r1", 1, seed=seed, **rev, is_cap=2.0)),
                 (f"reverse_kl async k=1 no IS seed {seed}", variant("r1n", 1, seed=seed, **rev, is_cap=0.0))]
    for name, cfg in arms:
        r = res[name] = run(cfg, args.steps, args.warmup, prep)
        print(f"{name:40s} steps/s {r['steps_per_s']:6.2f}  divergence {r['divergence']:.4f}  accuracy "
              f"{r['accuracy']:.3f}  weight sync {100 * r['weight_sync_share']:.2f}% of a step  IS clipped "
              f"{100 * r['is_clip']:.2f}%", flush=True)
    a, s = res["forward_kl async k=1"], res["forward_kl sync"]
    print(f"throughput: sync {s['steps_per_s']:.2f} steps/s, async {a['steps_per_s']:.2f} steps/s, ratio "
          f"{a['steps_per_s'] / s['steps_per_s']:.2f}x (one process, sampler thread; {args.steps} steps)")


if __name__ == "__main__":
    main()
