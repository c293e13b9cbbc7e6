"""Issue 8's experiment: where do OPD and reward-only RL (GRPO) move the weights?

Both arms start from the demo's weak student and take the same number of steps on the same prompts
per step (48 rollouts: OPD 16 prompts x 1 sample per domain, GRPO 4 prompts x 4 samples per domain):
  opd          exact forward KL to each domain's teacher on the student's samples (the demo's loss, AdamW 3e-3)
  opd_same_lr  the same at GRPO's learning rate
  grpo         group-normalised exact-match reward, no teacher (loss.rl_alpha = 0, sampled estimator)
Each run keeps a checkpoint every steps/10; `opd_jax.analysis` compares the final weights with the
start (sparsity at float32 and at bfloat16 resolution, movement by module and layer, spectra,
overlap with W0's top subspace, near-zero preference) and the alignment of every checkpoint's
update with the final one.

    python scripts/experiments/opd_vs_grpo.py [--steps 300] [--seeds 0 1 2]

Writes docs/results_analysis.json, docs/plots/analysis_<arm>/*.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import run_arm, summary  # noqa: E402

from opd_jax.analysis.report import load_params, plot_report, run_series  # noqa: E402
from opd_jax.analysis.updates import alignment_series, analyze_update  # noqa: E402
from opd_jax.demo import prepare  # noqa: E402

ARMS = {
    "opd": {},
    "opd_same_lr": {},  # OPD at GRPO's learning rate: geometry compared at equal step size
    "grpo": {"loss": dict(estimator_type="sampled", rl_alpha=0.0, rl_mode="mix"),
             "data": dict(per_domain=4, group_size=4)},
}


def digest(rep: dict, rep_bf16: dict, align: list, steps: list) -> dict:
    mats = [m for m in rep["matrices"] if "effective_rank" in m and m["module"] != "embedding"]
    rank_ratio = [m["numerical_rank"] / m["full_rank"] for m in mats]
    return {
        "sparsity_f32": rep["sparsity"], "sparsity_bf16": rep_bf16["sparsity"],
        "movement_by_module": rep["relative_movement_by_module"],
        "movement_by_layer": rep["relative_movement_by_layer"],
        "numerical_rank_fraction": float(np.mean(rank_ratio)),
        "effective_rank_fraction": float(np.mean([m["effective_rank"] / m["full_rank"] for m in mats])),
        "energy_top_k": float(np.mean([m["energy_top_k"] for m in mats])),
        "overlap_with_w0": float(np.mean([m["overlap_with_w0"] for m in mats])),
        "overlap_random_baseline": float(np.mean([rep["k"] / m["full_rank"] for m in mats])),
        "near_zero_preference_bf16": rep_bf16["near_zero_preference_mean"],
        "alignment": [{"step": s, "alignment": a["alignment"]} for s, a in zip(steps, align)],
        "k": rep["k"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--grpo-lr", type=float, default=3e-4)
    ap.add_argument("--work", default="runs/experiments_analysis")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(work / "base")
    p0 = load_params(prep["student"])
    every = max(args.steps // 10, 1)
    res = {"steps": args.steps, "grpo_lr": args.grpo_lr, "before": prep["before"], "arms": {}}
    for arm, sections in ARMS.items():
        for seed in args.seeds:
            optim = {"lr": args.grpo_lr} if arm in ("grpo", "opd_same_lr") else {}
            r = run_arm(prep, work / f"{arm}_s{seed}", steps=args.steps, seed=seed, optim=optim,
                        train={"checkpoint_every": every, "keep_checkpoints": 11}, **sections)
            p1 = r["params"]
            rep = analyze_update(p0, p1)
            rep_bf16 = analyze_update(p0, p1, dtype="bfloat16")
            series = run_series(work / f"{arm}_s{seed}")
            align = alignment_series([p0] + [p for _, p in series])
            d = digest(rep, rep_bf16, align, [s for s, _ in series])
            d.update(seed=seed, accuracy=r["accuracy"], final_reward=float(np.nanmean(r["reward"][-20:])),
                     seconds=r["seconds"])
            res["arms"].setdefault(arm, []).append(d)
            if seed == args.seeds[0]:
                (out / "plots" / f"analysis_{arm}").mkdir(parents=True, exist_ok=True)
                rep["alignment"] = d["alignment"]
                plot_report(rep, out / "plots" / f"analysis_{arm}")
            print(f"{arm} seed {seed}: acc {r['accuracy']['mean']:.3f}, sparsity f32 {d['sparsity_f32']:.3f} "
                  f"bf16 {d['sparsity_bf16']:.3f}, overlap {d['overlap_with_w0']:.3f} "
                  f"(random {d['overlap_random_baseline']:.3f}), align@10% {d['alignment'][0]['alignment']:.2f}",
                  flush=True)
            (out / "results_analysis.json").write_text(json.dumps(res, indent=1))
    table(res)


def table(res):
    arms = list(res["arms"])
    print("\n| measure | " + " | ".join(arms) + " |")
    print("| --- | " + " | ".join("---" for _ in arms) + " |")

    def row(label, f):
        print(f"| {label} | " + " | ".join(summary([f(r) for r in res["arms"][a]]) for a in arms) + " |")

    row("final mean accuracy", lambda r: r["accuracy"]["mean"])
    row("sparsity (float32: coordinates that did not move)", lambda r: r["sparsity_f32"])
    row("sparsity at bfloat16 resolution", lambda r: r["sparsity_bf16"])
    mods = sorted(res["arms"][arms[0]][0]["movement_by_module"])
    for m in mods:
        row(f"relative movement {m}", lambda r, m=m: r["movement_by_module"].get(m, np.nan))
    row("numerical rank / full rank of dW", lambda r: r["numerical_rank_fraction"])
    row("effective rank / full rank of dW", lambda r: r["effective_rank_fraction"])
    row("top-k energy fraction of dW", lambda r: r["energy_top_k"])
    row("overlap of dW's top-k with W0's top-k", lambda r: r["overlap_with_w0"])
    row("  same for a random subspace (k/n)", lambda r: r["overlap_random_baseline"])
    row("near-zero preference (bf16 resolution)", lambda r: r["near_zero_preference_bf16"])
    for i in (0, 1, 4):
        row(f"alignment with final update at {10 * (i + 1)}% of steps", lambda r, i=i: r["alignment"][i]["alignment"])


if __name__ == "__main__":
    main()
