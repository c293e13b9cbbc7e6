"""Does packing change the demo's outcome? The demo's OPD stage (opd_jax.demo: teachers from the cache, the
same weak student) trained padded and with `data.pack_tokens`, for several training seeds, on one CPU
device. Prints each run's greedy accuracy per domain and student / teacher ratio, then the spread across
seeds of each layout and the packed - padded difference per seed, so the layouts' difference can be read
against the seeds' spread. A control arm, "micro" (padded rows, each teacher's 16 in two micro-batches of 8: the same gradient
summed in another order), shows how far rounding alone moves the outcome.

    python scripts/experiments/demo_packing.py --seeds 0 1 2 --pack 48
    python scripts/experiments/demo_packing.py --seeds 0 1 2 3 4 --arms padded micro
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from opd_jax.demo import DOMAINS, _ratio, prepare
from common import run_arm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--pack", type=int, default=48, help="data.pack_tokens of the packed runs")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--out", default="")
    ap.add_argument("--arms", nargs="*", default=["padded", "packed"], choices=["padded", "packed", "micro"])
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="demo_packing_"))
    prep = prepare(out / "prep", log=lambda *_: None)
    rows = []
    for seed in a.seeds:
        for arm in a.arms:
            data = {"pack_tokens": a.pack if arm == "packed" else 0}
            train = {"micro_batch": 8} if arm == "micro" else {}  # each teacher's 16 rows in two micro-batches
            r = run_arm(prep, out / f"{arm}_{seed}", steps=a.steps, seed=seed, data=data, train=train)
            acc = r["accuracy"]
            fraction = np.nanmean([x.get("update/real_token_fraction", np.nan) for x in r["records"]])
            row = {"seed": seed, "arm": arm, **{d: acc[d] for d in DOMAINS},
                   "ratio": round(_ratio(acc, prep["teacher_acc"]), 3), "real_token_fraction": round(float(fraction), 3),
                   "final_loss": round(float(r["records"][-1]["loss"]), 5), "seconds": r["seconds"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"teachers: {json.dumps(prep['teacher_acc'])}")
    print(f"{'seed':>4} {'arm':<7} " + " ".join(f"{d:>8}" for d in DOMAINS) + f" {'ratio':>6}")
    for r in rows:
        print(f"{r['seed']:>4} {r['arm']:<7} " + " ".join(f"{r[d]:8.2f}" for d in DOMAINS) + f" {r['ratio']:6.2f}")
    for key in list(DOMAINS) + ["ratio"]:
        base = np.array([r[key] for r in rows if r["arm"] == a.arms[0]])
        for arm in a.arms[1:]:
            other = np.array([r[key] for r in rows if r["arm"] == arm])
            print(f"{key:<9} {a.arms[0]} {base.mean():.3f} (seeds {base.min():.2f}-{base.max():.2f}), {arm} "
                  f"{other.mean():.3f} (seeds {other.min():.2f}-{other.max():.2f}); {arm} - {a.arms[0]} per seed: "
                  + ", ".join(f"{d:+.2f}" for d in other - base))


if __name__ == "__main__":
    main()
