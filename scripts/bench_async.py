"""Asynchronous (train.max_staleness 1) against synchronous OPD on the demo's shapes, in one run.

Both sides train the same random student (the demo's student shape) against three random teachers
(the demo's teacher shape, one per domain) with the demo's data shapes (16 prompts per domain, 8 new
tokens), exact forward KL. The asynchronous side runs the sampler (and the teachers' scoring) in a
thread of the same process while the learner updates; XLA:CPU runs the two programs at once on the
machine's cores. Timed: the wall time of steps --warmup..--steps (compiles excluded). Also printed:
the weight sync's share of a step, the teacher divergence reached, and reverse KL (sampled-token
estimator) at k = 1 with and without the truncated importance weights.

    python scripts/bench_async.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def run(cfg_over: list[str], out: Path, steps: int, warmup: int):
    from opd_jax.config import load_config
    from opd_jax.hooks import Logger, SkipCounter
    from opd_jax.run import build_run
    from opd_jax.train import train_loop

    run = build_run(load_config(None, cfg_over + [f"train.out_dir={out}", f"train.steps={steps}"]))
    recs, times = [], []

    class Clock:
        def after_step(self, ctx):
            times.append(time.perf_counter())
            recs.append(dict(ctx.record))

    train_loop(run, run.init, [SkipCounter(3), Logger(run), Clock()], start=0, end=steps)
    wall = times[-1] - times[warmup - 1]
    div = [r.get("on_policy/divergence", np.nan) for r in recs]
    sync = [r.get("time/weight_sync", 0.0) / r["time/step"] for r in recs[warmup:] if "time/step" in r]
    return {"steps_per_s": (steps - warmup) / wall, "divergence_last10": float(np.mean(div[-10:])),
            "weight_sync_share": float(np.mean(sync)) if sync else 0.0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    from opd_jax.demo import DOMAINS, MAX_NEW, MAX_PROMPT, STUDENT, TEACHER
    from opd_jax.models import ModelConfig, init_model, save_model

    tmp = Path(tempfile.mkdtemp())
    teachers = [f"{{name: {d}, path: {save_model(init_model(ModelConfig(**TEACHER), seed=10 + i), tmp / d)}}}"
                for i, d in enumerate(DOMAINS)]
    base = [f"student.init={json.dumps(STUDENT)}", f"teachers=[{', '.join(teachers)}]",
            "routing={" + ", ".join(f"{d}: {d}" for d in DOMAINS) + "}", "data.per_domain=16", "data.group_size=1",
            f"data.max_prompt_len={MAX_PROMPT}", f"data.max_new_tokens={MAX_NEW}", "optim.lr=3e-3",
            "train.progress=false", "train.eval_every=100000", "train.checkpoint_every=100000"]
    fwd = base + ["loss.estimator_type=full", "loss.kind=forward_kl"]
    rev = base + ["loss.estimator_type=sampled", "loss.kind=reverse_kl"]
    res = {}
    for name, over in (("forward_kl sync", fwd + ["train.max_staleness=0"]),
                       ("forward_kl async k=1", fwd + ["train.max_staleness=1"]),
                       ("reverse_kl sync", rev + ["train.max_staleness=0"]),
                       ("reverse_kl async k=1 IS cap 2", rev + ["train.max_staleness=1", "loss.is_cap=2"]),
                       ("reverse_kl async k=1 no IS", rev + ["train.max_staleness=1", "loss.is_cap=0"])):
        res[name] = run(over, tmp / name.replace(" ", "_"), args.steps, args.warmup)
        r = res[name]
        print(f"{name:32s} steps/s {r['steps_per_s']:6.2f}  divergence(last 10) {r['divergence_last10']:.4f}  "
              f"weight sync {100 * r['weight_sync_share']:.2f}% of a step", flush=True)
    ratio = res["forward_kl async k=1"]["steps_per_s"] / res["forward_kl sync"]["steps_per_s"]
    print(f"throughput: sync {res['forward_kl sync']['steps_per_s']:.2f} steps/s, async {res['forward_kl async k=1']['steps_per_s']:.2f}"
          f" steps/s, ratio {ratio:.2f}x (one process, sampler thread)")


if __name__ == "__main__":
    main()
