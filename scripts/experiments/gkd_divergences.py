"""Experiments on the demo's task, equal budget (steps x prompts), several seeds; writes
docs/results_gkd.json and docs/plots/gkd_*.png, and prints a markdown table.

Arms (all start from the demo's weak student with its three per-domain teachers):
  on_fkl      on-policy (lambda=1), exact forward KL over the vocabulary        (the demo's loss)
  off_fkl     off-policy / supervised KD (lambda=0): forward KL on dataset answers
  sft_teacher SFT on the teachers' own samples (temperature 1)
  on_rkl      on-policy, exact reverse KL               on_jsd   on-policy, exact JSD(0.5)
  smp_fkl_sg  sampled-token forward KL, stop-grad       smp_fkl_opd  sampled-token forward KL, OPD+
  smp_rkl_opd sampled-token reverse KL, OPD+ (vs on_rkl: sampled vs full vocabulary)

    python scripts/experiments/gkd_divergences.py [--steps 300] [--seeds 0 1 2] [--arms on_fkl off_fkl ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import run_arm  # noqa: E402

from opd_jax.demo import DOMAINS, MAX_NEW, MAX_PROMPT, opd_config, prepare
from opd_jax.evaluate import decode_completions
from opd_jax.models import load_model
from opd_jax.engine import generate
from opd_jax.sft import sft_train
from opd_jax.tasks import PromptSource, encode_prompts

ARMS = {
    "on_fkl": dict(estimator_type="full", kind="forward_kl", lam=1.0),
    "off_fkl": dict(estimator_type="full", kind="forward_kl", lam=0.0),
    "sft_teacher": None,
    "on_rkl": dict(estimator_type="full", kind="reverse_kl", lam=1.0),
    "on_jsd": dict(estimator_type="full", kind="jsd", beta=0.5, lam=1.0),
    "smp_fkl_sg": dict(estimator_type="sampled", kind="forward_kl", estimator="stop_grad"),
    "smp_fkl_opd": dict(estimator_type="sampled", kind="forward_kl", estimator="opd_plus"),
    "smp_rkl_opd": dict(estimator_type="sampled", kind="reverse_kl", estimator="opd_plus"),
}


def run_sft_on_teacher_samples(prep, cfg, seed):
    """SFT of the student on completions sampled from each prompt's teacher, same steps and prompts."""
    tok = prep["tokenizer"]
    teachers = {d: load_model(p) for d, p in prep["teachers"].items()}
    student = load_model(prep["student"])
    src = PromptSource(list(DOMAINS), seed=seed)
    per = cfg.data.per_domain

    def batches(step):
        pairs = []
        exs = src.batch(step, per)
        for i, d in enumerate(sorted(DOMAINS)):
            rows = exs[i * per:(i + 1) * per]
            ids, mask = encode_prompts(tok, [e.prompt for e in rows], MAX_PROMPT)
            roll = generate(teachers[d], jnp.asarray(ids), jnp.asarray(mask), key=jax.random.key(seed * 100003 + step),
                            max_new_tokens=MAX_NEW, temperature=1.0, eos_id=tok.eos_token_id)
            texts = decode_completions(tok, np.asarray(roll.tokens)[:, MAX_PROMPT:], roll.mask)
            pairs.extend((e.prompt, t) for e, t in zip(rows, texts))
        return pairs

    sft_train(student, tok, batches, steps=cfg.train.steps, lr=cfg.optim.lr, max_prompt_len=MAX_PROMPT,
              max_new_tokens=MAX_NEW, warmup=0)
    return student


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--work", default="runs/experiments")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    work = Path(args.work)
    prep = prepare(work / "base")
    results = {"steps": args.steps, "teachers": prep["teacher_acc"], "before": prep["before"], "arms": {}}
    for arm in args.arms:
        for seed in args.seeds:
            t0 = time.time()
            out_dir = work / f"{arm}_s{seed}"
            if ARMS[arm] is None:
                cfg = opd_config(prep, out_dir, steps=args.steps, seed=seed)
                acc, curve = prep["accuracy"](run_sft_on_teacher_samples(prep, cfg, seed)), []
            else:
                r = run_arm(prep, out_dir, steps=args.steps, seed=seed, loss=ARMS[arm])
                acc, curve = r["accuracy"], r["eval"]
            results["arms"].setdefault(arm, []).append({"seed": seed, "accuracy": acc, "curve": curve,
                                                        "seconds": round(time.time() - t0, 1)})
            print(f"{arm} seed {seed}: mean {acc['mean']:.3f} " + " ".join(f"{d} {acc[d]:.2f}" for d in DOMAINS)
                  + f" ({time.time() - t0:.0f} s)", flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "results_gkd.json").write_text(json.dumps(results, indent=2))
    table(results)
    plot(results, Path(args.out) / "plots")


def table(results):
    print("\n| arm | mean acc (± std over seeds) | " + " | ".join(DOMAINS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in DOMAINS) + " |")
    for arm, runs in results["arms"].items():
        m = np.array([r["accuracy"]["mean"] for r in runs])
        per = [np.mean([r["accuracy"][d] for r in runs]) for d in DOMAINS]
        print(f"| {arm} | {m.mean():.3f} ± {m.std():.3f} | " + " | ".join(f"{p:.2f}" for p in per) + " |")


def plot(results, folder: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    arms = list(results["arms"])
    means = [np.mean([r["accuracy"]["mean"] for r in results["arms"][a]]) for a in arms]
    stds = [np.std([r["accuracy"]["mean"] for r in results["arms"][a]]) for a in arms]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(arms, means, yerr=stds, capsize=4)
    ax.axhline(np.mean(list(results["teachers"].values())), color="k", ls="--", label="teachers")
    ax.axhline(results["before"]["mean"], color="gray", ls=":", label="student before")
    ax.set_ylabel("greedy accuracy (mean over domains)")
    ax.set_title(f"equal budget: {results['steps']} steps, {len(results['arms'][arms[0]])} seeds")
    ax.legend()
    plt.xticks(rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(folder / "gkd_final_accuracy.png", dpi=100)
    fig, ax = plt.subplots(figsize=(7, 4))
    for a in arms:
        curves = [r["curve"] for r in results["arms"][a] if r["curve"]]
        if curves:
            xs = [s for s, _ in curves[0]]
            ax.plot(xs, np.mean([[v for _, v in c] for c in curves], 0), label=a, marker="o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("eval accuracy (64 prompts/domain)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "gkd_curves.png", dpi=100)


if __name__ == "__main__":
    main()
