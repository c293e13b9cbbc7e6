"""Issue 7's experiments on the demo's task (three domains, per-domain teachers, weak student):

  effopd  plain OPD vs EffOPD (same everything else): steps to reach 95% of plain OPD's final
          reduction of the teacher divergence (20-step moving average of the on-policy divergence),
          and final accuracy.
  sparse  full OPD -> mask of the top p of moved coordinates (|W_T - W_0|, global) -> retrain from
          the start with only the mask trainable; fraction of the full gain recovered, vs a random
          mask of the same density.
  sgd     SGD (momentum 0.9) vs AdamW, each at its best learning rate from a sweep on seed 0.

    python scripts/experiments/optimizers.py [--parts effopd sparse sgd] [--steps 300] [--seeds 0 1 2]

Writes docs/results_optim.json and docs/plots/optim_*.png; prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import run_arm, smooth, summary  # noqa: E402

from opd_jax.analysis.report import load_params  # noqa: E402
from opd_jax.demo import prepare  # noqa: E402
from opd_jax.optim import mask_density, mask_from_update, random_mask, save_mask  # noqa: E402

EFFOPD_ARMS = {
    "plain": {},
    "effopd_k8_a2": dict(effopd_window=8, effopd_alpha_max=2.0),
    "effopd_k8_a4_guard": dict(effopd_window=8, effopd_alpha_max=4.0, effopd_guard=True),
}
# EffOPD as the paper describes it: a probe-batch line search over alpha in (0, 0.5, 1, 2, 4) along each
# window's update, with 4x the demo's batch (64 prompts per domain) so that window directions agree more
LINE_SEARCH_ARMS = {"plain": {}, "effopd_k8_line_search": dict(effopd_window=8, effopd_line_search=True)}
BIG_BATCH = {"per_domain": 64}
FRACTIONS = (0.01, 0.05, 0.10, 0.25)
LRS = {"adamw": (1e-3, 3e-3, 1e-2), "sgd": (0.03, 0.1, 0.3, 1.0, 3.0)}


def steps_to(curve, target):
    hit = np.nonzero(smooth(curve) <= target)[0]
    return int(hit[0]) + 1 if hit.size else None


def part_effopd(prep, work, steps, seeds, res, name="effopd", base=None, arms=None, data=None):
    """base: optimizer settings shared by every arm (the default: the demo's AdamW 3e-3, cosine);
    arms: name -> optimizer settings (default EFFOPD_ARMS); data: data settings shared by every arm."""
    out = res.setdefault(name, {"arms": {}, "base_optim": base or {}, "data": data or {}})
    for seed in seeds:
        runs = {arm: run_arm(prep, work / f"{name}_{arm}_s{seed}", steps=steps, seed=seed, optim={**(base or {}), **o},
                             **({"data": data} if data else {}))
                for arm, o in (arms or EFFOPD_ARMS).items()}
        plain = smooth(runs["plain"]["divergence"])
        start = float(np.mean(runs["plain"]["divergence"][:5]))
        target = start - 0.95 * (start - plain[-1])
        plain_steps = steps_to(runs["plain"]["divergence"], target)
        for arm, r in runs.items():
            n = steps_to(r["divergence"], target)
            rolled = [x["effopd/rolled_back"] for x in r["records"] if "effopd/rolled_back" in x]
            alphas = [x["effopd/alpha"] for x in r["records"] if "effopd/alpha" in x]
            cosines = [x["effopd/cosine"] for x in r["records"] if "effopd/cosine" in x][1:]  # the first has no d_{k-1}
            out["arms"].setdefault(arm, []).append({
                "seed": seed, "steps_to_target": n, "speedup": (plain_steps / n) if n else 0.0,
                "final_divergence": float(smooth(r["divergence"])[-1]), "accuracy": r["accuracy"],
                "divergence": [float(v) for v in r["divergence"]], "rollbacks": int(sum(rolled)),
                "jumps": len(rolled), "mean_alpha": float(np.mean(alphas)) if alphas else None,
                "alphas": [float(a) for a in alphas], "mean_cosine": float(np.mean(cosines)) if cosines else None,
                "seconds": r["seconds"]})
            print(f"{name} {arm} seed {seed}: steps to target {n} (plain {plain_steps}), acc {r['accuracy']['mean']:.3f}, "
                  f"final div {smooth(r['divergence'])[-1]:.4f}", flush=True)
        yield
    print(f"\n{name}: | arm | steps to 95% of plain's reduction | speed-up vs plain | final divergence | final mean acc "
          f"| cos(d_k, d_k-1) | mean alpha |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arm, rs in out["arms"].items():
        n = [r["steps_to_target"] or steps + 1 for r in rs]
        cos = [r["mean_cosine"] for r in rs if r["mean_cosine"] is not None]
        alpha = [r["mean_alpha"] for r in rs if r["mean_alpha"] is not None]
        print(f"| {arm} | {summary(n)} | {summary([r['speedup'] for r in rs])} | "
              f"{summary([r['final_divergence'] for r in rs])} | {summary([r['accuracy']['mean'] for r in rs])} | "
              f"{summary(cos) if cos else '-'} | {summary(alpha) if alpha else '-'} |")


def unchanged_fraction(p0, p1) -> float:
    """Fraction of coordinates bit-identical between two parameter trees (in p1's dtype)."""
    same = sum(int(np.sum(np.asarray(a).astype(b.dtype) == b)) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))
    return same / sum(b.size for b in jax.tree.leaves(p1))


def part_sparse(prep, work, steps, seeds, res, name="sparse", student=None, optim=None, fractions=FRACTIONS):
    """student / optim: settings shared by every run (bf16: student.dtype bfloat16, optim.state_dtype float32)."""
    out = res.setdefault(name, {"runs": [], "student": student or {}, "optim": optim or {}})
    base = {k: v for k, v in (("student", student), ("optim", optim)) if v}
    before = prep["before"]["mean"]
    p0 = jax.tree.map(np.asarray, load_params(prep["student"]))  # the start every arm shares
    for seed in seeds:
        full = run_arm(prep, work / f"{name}_full_s{seed}", steps=steps, seed=seed, **base)
        p1 = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), full["params"])
        delta = jax.tree.map(lambda a, b: b.astype(np.float32) - a.astype(b.dtype).astype(np.float32), p0, p1)
        full_gain = full["accuracy"]["mean"] - before
        div0 = float(np.mean(full["divergence"][:5]))
        full_div_gain = div0 - smooth(full["divergence"])[-1]
        row = {"seed": seed, "full_accuracy": full["accuracy"], "full_gain": full_gain,
               "unchanged": unchanged_fraction(p0, p1), "masks": []}
        print(f"{name} seed {seed}: full run acc {full['accuracy']['mean']:.3f}, {row['unchanged']:.2%} of coordinates "
              "bit-identical to the start", flush=True)
        for p in fractions:
            for kind in ("top", "random"):
                mask = mask_from_update(delta, p) if kind == "top" else random_mask(p0, p, seed=seed + 17)
                path = save_mask(mask, work / f"{name}_mask_{kind}_{p}_s{seed}.safetensors")
                r = run_arm(prep, work / f"{name}_{kind}_{p}_s{seed}", steps=steps, seed=seed,
                            **{**base, "optim": {**(optim or {}), "mask": str(path)}})
                gain = r["accuracy"]["mean"] - before
                div_gain = div0 - smooth(r["divergence"])[-1]
                row["masks"].append({"p": p, "kind": kind, "density": mask_density(mask), "accuracy": r["accuracy"],
                                     "gain_recovered": gain / full_gain if full_gain else None,
                                     "divergence_gain_recovered": div_gain / full_div_gain})
                print(f"{name} seed {seed} {kind} p={p}: acc {r['accuracy']['mean']:.3f} (full {full['accuracy']['mean']:.3f},"
                      f" before {before:.3f}) -> {gain / full_gain:.2f} of the gain, "
                      f"{div_gain / full_div_gain:.2f} of the divergence reduction", flush=True)
        out["runs"].append(row)
        yield
    print(f"\n{name}: full-run coordinates bit-identical to the start: {summary([r['unchanged'] for r in out['runs']])}")
    print("| p | top-p mask: accuracy gain recovered | divergence reduction recovered | random mask: accuracy gain | random: divergence |")
    print("| --- | --- | --- | --- | --- |")
    for p in fractions:
        g = {k: [m for r in out["runs"] for m in r["masks"] if m["p"] == p and m["kind"] == k] for k in ("top", "random")}
        print(f"| {p:.0%} | {summary([m['gain_recovered'] for m in g['top']])} | "
              f"{summary([m['divergence_gain_recovered'] for m in g['top']])} | "
              f"{summary([m['gain_recovered'] for m in g['random']])} | "
              f"{summary([m['divergence_gain_recovered'] for m in g['random']])} |")


def part_sgd(prep, work, steps, seeds, res):
    out = res.setdefault("sgd", {"sweep": {}, "best": {}})
    for name, lrs in LRS.items():
        for lr in lrs:
            r = run_arm(prep, work / f"opt_{name}_{lr}_s{seeds[0]}", steps=steps, seed=seeds[0],
                        optim={"name": name, "lr": lr})
            out["sweep"].setdefault(name, []).append({"lr": lr, "accuracy": r["accuracy"],
                                                      "final_divergence": float(smooth(r["divergence"])[-1])})
            print(f"sgd-vs-adamw sweep {name} lr {lr}: acc {r['accuracy']['mean']:.3f}", flush=True)
        best = max(out["sweep"][name], key=lambda x: x["accuracy"]["mean"])
        runs = [{"seed": seeds[0], "accuracy": best["accuracy"], "final_divergence": best["final_divergence"]}]
        for seed in seeds[1:]:
            r = run_arm(prep, work / f"opt_{name}_{best['lr']}_s{seed}", steps=steps, seed=seed,
                        optim={"name": name, "lr": best["lr"]})
            runs.append({"seed": seed, "accuracy": r["accuracy"], "final_divergence": float(smooth(r["divergence"])[-1])})
        out["best"][name] = {"lr": best["lr"], "runs": runs}
        yield
    print("\n| optimizer | best lr (seed-0 sweep) | final mean acc | final divergence |")
    print("| --- | --- | --- | --- |")
    for name, b in out["best"].items():
        print(f"| {name} | {b['lr']} | {summary([r['accuracy']['mean'] for r in b['runs']])} | "
              f"{summary([r['final_divergence'] for r in b['runs']])} |")


def plot(res, folder: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("effopd", "effopd_lowlr", "effopd_line_search"):
        if name not in res:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, rs in res[name]["arms"].items():
            m = np.mean([smooth(r["divergence"]) for r in rs], 0)
            ax.plot(np.arange(1, len(m) + 1), m, label=arm)
        ax.set_xlabel("step")
        ax.set_ylabel("on-policy forward KL (20-step avg, mean of seeds)")
        ax.set_title(f"optimizer {res[name].get('base_optim') or 'AdamW 3e-3 cosine'}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"optim_{name}.png", dpi=100)
        plt.close(fig)
    for name in ("sparse", "sparse_bf16", "sparse_bf16_lowlr"):
        if name not in res:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ps = sorted({m["p"] for r in res[name]["runs"] for m in r["masks"]})
        if not ps:
            plt.close(fig)
            continue
        for kind in ("top", "random"):
            ys = [np.mean([m["divergence_gain_recovered"] for r in res[name]["runs"] for m in r["masks"]
                           if m["p"] == p and m["kind"] == kind]) for p in ps]
            ax.plot([100 * p for p in ps], ys, marker="o", label=f"{kind} mask")
        ax.set_xscale("log")
        ax.set_xlabel("trainable coordinates (%)")
        ax.set_ylabel("fraction of full OPD's divergence reduction")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"optim_{name}.png", dpi=100)
        plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+", default=["effopd", "sparse", "sgd"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default="runs/experiments_optim")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    work = Path(args.work)
    prep = prepare(work / "base")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "results_optim.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res.update({"before": prep["before"], "teachers": prep["teacher_acc"]})
    parts = {"effopd": part_effopd, "sparse": part_sparse, "sgd": part_sgd,
             # a gentler base optimizer, where each step moves less and extrapolation has room to help
             "effopd_lowlr": lambda *a: part_effopd(*a, name="effopd_lowlr",
                                                    base={"lr": 1e-3, "schedule": "constant"}),
             # bfloat16 parameters with float32 Adam state, as LLM post-training runs; at the demo's learning rate
             # and at 1/10 of it, where more updates fall below half a bf16 step of their weight
             # (at the demo's rate only the full runs: how many coordinates stay bit-identical)
             "sparse_bf16": lambda *a: part_sparse(*a, name="sparse_bf16", student={"dtype": "bfloat16"},
                                                   optim={"state_dtype": "float32"}, fractions=()),
             "sparse_bf16_lowlr": lambda *a: part_sparse(*a, name="sparse_bf16_lowlr", student={"dtype": "bfloat16"},
                                                         optim={"state_dtype": "float32", "lr": 3e-4},
                                                         fractions=(0.05, 0.10)),
             "effopd_line_search": lambda *a: part_effopd(*a, name="effopd_line_search", arms=LINE_SEARCH_ARMS,
                                                          data=BIG_BATCH)}
    for name in args.parts:
        res.pop(name, None)
        res.setdefault("steps_per_part", {})[name] = args.steps
        for _ in parts[name](prep, work, args.steps, args.seeds, res):
            path.write_text(json.dumps(res, indent=1))
            plot(res, Path(args.out) / "plots")
    path.write_text(json.dumps(res, indent=1))
    plot(res, Path(args.out) / "plots")


if __name__ == "__main__":
    main()
