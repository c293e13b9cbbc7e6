"""Rollout-horizon experiment (issue 25, part 1): on the long-horizon `carry` task, does training on
the first part of each rollout match the whole horizon, per generated token and per FLOP?

Same teacher, student, prompts and optimizer as scripts/experiments/long_horizon.py (its `prepare`:
the mistake-trained 128-wide teacher and the SFT-warm-started 64-wide student), on-policy exact
forward KL (that experiment's `on_fkl` arm, learning rate 3e-3 chosen there on a validation seed),
100 steps of 32 prompts, arms differing only in data.horizon:

  full         the whole 41 new tokens
  h10          10% (rounded up to the first of 8 length buckets: 6 tokens)
  h25          25% (11 tokens)
  progressive  from 10%, one bucket longer whenever the mean batch divergence over the last 5 steps
               stops falling (data.horizon_schedule=progressive, window 5)

Accuracy: greedy, final sum exact, 128 held-out prompts (the same as long_horizon's). Generated tokens:
the completion tokens sampled over the run (every step logged). FLOPs: 2 N T per forward pass over T
positions, 6 N T forward + backward, per step: student sampling + teacher scoring + student update
over the cut rows, T = prompt + h per row.

    python scripts/experiments/horizon.py [--steps 100] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import summary  # noqa: E402
from long_horizon import ARMS, MAX_NEW, MAX_PROMPT, config, eval_curve, n_params, prepare  # noqa: E402

from opd_jax.export import load_run_model  # noqa: E402
from opd_jax.train import train  # noqa: E402

HORIZONS = {"full": dict(horizon=1.0), "h10": dict(horizon=0.1), "h25": dict(horizon=0.25),
            "progressive": dict(horizon=0.1, horizon_schedule="progressive", horizon_window=5)}


def run(prep, arm: str, out_dir: Path, *, steps: int, seed: int, lr: float) -> dict:
    t0 = time.time()
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = config(prep, out_dir, steps=steps, seed=seed, lr=lr, loss=ARMS["on_fkl"], warmup=10)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **HORIZONS[arm]),
                              train=dataclasses.replace(cfg.train, log_every=1))
    train(cfg)
    recs = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = cfg.data.per_domain * cfg.data.group_size
    hs = [r["rollout/horizon"] for r in recs]
    generated = float(sum(r["rollout/mean_length"] * rows for r in recs))
    ns, nt = prep["n_student"], prep["n_teacher"]
    flops = np.cumsum([rows * (MAX_PROMPT + h) * (2 * ns + 2 * nt + 6 * ns) for h in hs])
    return {"seed": seed, "accuracy": prep["acc"](load_run_model(out_dir)), "generated_tokens": generated,
            "flops": float(flops[-1]), "flops_by_step": flops.tolist(), "horizons": hs,
            "curve": eval_curve(out_dir), "seconds": round(time.time() - t0, 1)}


def at_flops(r: dict, budget: float):
    """The run's eval curve read at `budget` FLOPs (linear between eval points; None past its end)."""
    fl = [0.0] + r["flops_by_step"]
    xs = [fl[s] for s, _ in r["curve"]]
    if not xs or budget > xs[-1] or budget < xs[0]:
        return None
    return float(np.interp(budget, xs, [a for _, a in r["curve"]]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--arms", nargs="+", default=list(HORIZONS))
    ap.add_argument("--work", default="runs/long_horizon")
    ap.add_argument("--out", default="docs/results_horizon.json")
    args = ap.parse_args()
    work = Path(args.work)
    prep = prepare(work, 1500, 900, 0.3)
    prep["n_student"], prep["n_teacher"] = n_params(prep["student"]), n_params(prep["teacher"])
    results = {"args": vars(args), "teacher": prep["teacher_acc"], "before": prep["before"], "arms": {},
               "max_new_tokens": MAX_NEW}
    for arm in args.arms:
        runs = []
        for seed in args.seeds:
            tag = "" if args.lr == 3e-3 else f"_lr{args.lr:g}"
            runs.append(run(prep, arm, work / f"horizon_{arm}{tag}_s{seed}", steps=args.steps, seed=seed, lr=args.lr))
            print(f"{arm} seed {seed}: accuracy {runs[-1]['accuracy']:.3f}, {runs[-1]['generated_tokens']:.0f} "
                  f"tokens, horizons {sorted(set(runs[-1]['horizons']))} ({runs[-1]['seconds']:.0f} s)", flush=True)
        results["arms"][arm] = {"runs": runs}
        Path(args.out).write_text(json.dumps(results, indent=2))
    # the cheapest arm's total FLOPs: every arm's eval curve read there
    budget = min(np.mean([r["flops"] for r in a["runs"]]) for a in results["arms"].values())
    before = results["before"]
    print(f"\nteacher {results['teacher']:.3f}, student before {before:.3f}, {args.steps} steps, "
          f"equal-FLOP budget {budget:.3g}")
    print("| arm | final accuracy (± std, 3 seeds) | generated tokens | FLOPs | accuracy gain per 1M generated "
          "tokens | accuracy gain per PFLOP | trainer-eval accuracy at the cheapest arm's FLOPs |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for arm, a in results["arms"].items():
        rs = a["runs"]
        acc = [r["accuracy"] for r in rs]
        tok = np.mean([r["generated_tokens"] for r in rs])
        fl = np.mean([r["flops"] for r in rs])
        eq = [x for x in (at_flops(r, budget) for r in rs) if x is not None]
        a["summary"] = {"accuracy": summary(acc), "generated_tokens": tok, "flops": fl,
                        "gain_per_mtoken": (np.mean(acc) - before) / tok * 1e6,
                        "gain_per_pflop": (np.mean(acc) - before) / fl * 1e15,
                        "at_equal_flops": summary(eq) if eq else None}
        s = a["summary"]
        print(f"| {arm} | {s['accuracy']} | {tok:,.0f} | {fl:.3g} | {s['gain_per_mtoken']:+.3f} | "
              f"{s['gain_per_pflop']:+.3f} | {s['at_equal_flops'] or '-'} |")
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
