"""The long-horizon experiment (issue 15): does on-policy distillation beat off-policy KD where a
student's early mistakes compound?

Task: the built-in `carry` domain (addition written digit by digit with carries, 21-39 characters,
scored on the final sum). Teacher: SFT on gold answers with injected mistakes (a wrong token with its
loss masked, then the correct continuation), so its next-token targets stay useful on the student's
wrong prefixes. Student: smaller, SFT warm start on gold answers (as the GKD paper does), then each arm
runs the same number of steps on the same prompts:

  sft_gold   more SFT on gold answers                    off_fkl   off-policy KD (lambda = 0)
  gkd_fkl    GKD lambda = 0.5                              on_fkl    on-policy, exact forward KL
  on_rkl     on-policy, exact reverse KL                  on_jsd    on-policy, exact JSD(0.5)
  smp_rkl_sg sampled-token reverse KL, stop-gradient advantage (tinker-cookbook's recipe)
  smp_rkl_loo sampled-token reverse KL, OPD+ with the leave-one-out baseline

Each arm's learning rate is picked from --lrs on a validation seed (held-out prompts), then the arm
runs --seeds. Accuracy: greedy, 128 held-out prompts, final sum exact. Equal compute is reported
alongside equal steps: FLOPs per step are counted as 2 N T per forward pass over T tokens (N
parameters), 3x that for forward + backward, and the on-policy arms also pay for sampling (one student
forward over prompt and answer); each arm's eval curve is read at the FLOPs that off-policy KD spends in
--steps steps (linear interpolation between eval points).

    python scripts/experiments/long_horizon.py [--steps 100] [--seeds 0 1 2] [--lrs 3e-4 1e-3 3e-3] [--arms ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from common import summary  # noqa: E402

from opd_jax.config import Config, DataConfig, LossConfig, ModelSpec, OptimConfig, TeacherSpec, TrainConfig
from opd_jax.evaluate import greedy_accuracy
from opd_jax.models import ModelConfig, init_model, load_model, save_model
from opd_jax.sft import sft_train
from opd_jax.tasks import PromptSource, build_char_tokenizer, verifiers_for
from opd_jax.export import load_run_model
from opd_jax.train import train

DOMAIN = "carry"
TEACHER = dict(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
               head_dim=32, max_position_embeddings=96)
STUDENT = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=16, max_position_embeddings=96)
MAX_PROMPT, MAX_NEW = 18, 41
ARMS = {
    "sft_gold": None,
    "off_fkl": dict(estimator_type="full", kind="forward_kl", lam=0.0),
    "gkd_fkl": dict(estimator_type="full", kind="forward_kl", lam=0.5),
    "on_fkl": dict(estimator_type="full", kind="forward_kl", lam=1.0),
    "on_rkl": dict(estimator_type="full", kind="reverse_kl", lam=1.0),
    "on_jsd": dict(estimator_type="full", kind="jsd", beta=0.5, lam=1.0),
    "smp_rkl_sg": dict(estimator_type="sampled", kind="reverse_kl", estimator="stop_grad"),
    "smp_rkl_loo": dict(estimator_type="sampled", kind="reverse_kl", estimator="opd_plus", baseline="loo"),
}


def prepare(work: Path, teacher_steps: int, student_steps: int, mistake_rate: float, log=print,
            mistakes: str = "all") -> dict:
    """Tokenizer, the mistake-trained teacher and the SFT-warm-started student (each trained once).
    mistakes: which tokens an injected mistake is drawn from, "all" (every non-special token) or "digits"
    (a wrong digit, the kind of mistake the student makes)."""
    work.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(work / "tokenizer")
    dom_src = PromptSource([DOMAIN], seed=1000)
    pairs = lambda src, n: lambda s: [(e.prompt, e.answer) for e in src.batch(s, n)]  # noqa: E731
    eval_set = PromptSource([DOMAIN], seed=0).batch(0, 128, stream=1)
    val_set = PromptSource([DOMAIN], seed=0).batch(0, 128, stream=3)
    verify = verifiers_for({}, [DOMAIN])

    def acc(model, examples=eval_set):
        return greedy_accuracy(model, tok, examples, max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW,
                               verifiers=verify)[DOMAIN]

    teacher_dir = work / ("teacher" if mistakes == "all" else f"teacher_{mistakes}_{mistake_rate:g}")
    digits = [tok.convert_tokens_to_ids(c) for c in "0123456789"]
    if not (teacher_dir / "config.json").exists():
        t0 = time.time()
        teacher = init_model(ModelConfig.for_family("qwen3", **TEACHER), seed=1)
        sft_train(teacher, tok, pairs(dom_src, 32), steps=teacher_steps, lr=3e-3, max_prompt_len=MAX_PROMPT,
                  max_new_tokens=MAX_NEW, mistake_rate=mistake_rate, progress="teacher SFT (with mistakes)",
                  mistake_tokens=digits if mistakes == "digits" else None)
        save_model(teacher, teacher_dir)
        log(f"teacher: {teacher_steps} SFT steps, mistake rate {mistake_rate} ({mistakes}), {time.time() - t0:.0f} s")
    student_dir = work / "student_init"
    if not (student_dir / "config.json").exists():
        student = init_model(ModelConfig.for_family("qwen3", **STUDENT), seed=7)
        sft_train(student, tok, pairs(PromptSource([DOMAIN], seed=2000), 16), steps=student_steps, lr=3e-3,
                  max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW, progress="student SFT warm start")
        save_model(student, student_dir)
    prep = {"work": work, "tokenizer": tok, "teacher": teacher_dir, "student": student_dir, "acc": acc,
            "val_set": val_set}
    prep["teacher_acc"] = acc(load_model(teacher_dir))
    prep["before"] = acc(load_model(student_dir))
    log(f"teacher accuracy {prep['teacher_acc']:.3f}, student before {prep['before']:.3f}")
    return prep


def config(prep, out_dir: Path, *, steps: int, seed: int, lr: float, loss: dict, warmup: int) -> Config:
    return Config(
        student=ModelSpec(path=str(prep["student"])),
        teachers=(TeacherSpec(name="t", path=str(prep["teacher"])),),
        routing={DOMAIN: "t"},
        data=DataConfig(domains=(DOMAIN,), tokenizer=str(prep["work"] / "tokenizer"), per_domain=32, group_size=1,
                        max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW, temperature=1.0),
        loss=LossConfig(**loss),
        optim=OptimConfig(name="adamw", lr=lr, schedule="cosine", warmup_steps=warmup, clip_norm=1.0),
        train=TrainConfig(steps=steps, seed=seed, out_dir=str(out_dir), checkpoint_every=steps,
                          eval_every=max(steps // 5, 1), eval_per_domain=64, log_every=10, progress=False),
    )


def n_params(folder) -> int:
    import jax
    from opd_jax.analysis.report import load_params
    return sum(x.size for x in jax.tree.leaves(load_params(folder)))


def flops_per_step(arm: str, n_student: int, n_teacher: int, rows: int = 32, tokens: int = MAX_PROMPT + MAX_NEW) -> float:
    """2 N T a forward pass, 6 N T forward + backward; on-policy rows also sample (2 N_s T) and every
    distillation row is scored by the teacher (2 N_t T). GKD computes both its parts every step."""
    fwd = lambda n: 2.0 * n * tokens * rows  # noqa: E731
    loss = ARMS[arm]
    if loss is None:
        return 3 * fwd(n_student)
    part = 3 * fwd(n_student) + fwd(n_teacher)
    lam = loss.get("lam", 1.0)
    return (fwd(n_student) + part if lam > 0 else 0.0) + (part if lam < 1 else 0.0)


def eval_curve(out_dir: Path) -> list:
    """[(step, mean greedy accuracy)] from the trainer's eval steps (its own 64 held-out prompts)."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    return [(r["step"], r["eval/mean/accuracy"]) for r in recs if "eval/mean/accuracy" in r]


def at_budget(curve, step: float):
    """The eval curve read at a (fractional) step, linearly between eval points (None outside them)."""
    import numpy as np
    if not curve or not curve[0][0] <= step <= curve[-1][0]:
        return None
    xs, ys = zip(*curve)
    return float(np.interp(step, xs, ys))


def run(prep, arm: str, out_dir: Path, *, steps: int, seed: int, lr: float, warmup: int = 10):
    """(final student model, seconds)."""
    t0 = time.time()
    shutil.rmtree(out_dir, ignore_errors=True)
    if ARMS[arm] is None:  # SFT on gold answers, same prompts per step
        model = load_model(prep["student"])
        src = PromptSource([DOMAIN], seed=seed)
        sft_train(model, prep["tokenizer"], lambda s: [(e.prompt, e.answer) for e in src.batch(s, 32)], steps=steps,
                  lr=lr, max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW, warmup=warmup)
        return model, time.time() - t0
    cfg = config(prep, out_dir, steps=steps, seed=seed, lr=lr, loss=ARMS[arm], warmup=warmup)
    train(cfg)
    return load_run_model(out_dir), time.time() - t0


def diagnose(prep, model, n: int = 256, seed: int = 5) -> dict:
    """Why on-policy data helps or not here, measured on `model`'s own T=1 samples of n held-out prompts:
    how many samples are wrong, where their first wrong character falls, what fraction of sampled
    tokens come after it (states off-policy KD never shows the student), and whether the teacher (and
    the student itself) still reach the right sum when they continue greedily from the sample cut just
    after its first error (a teacher that recovers gives useful targets on those states)."""
    import jax
    import numpy as np
    from opd_jax.evaluate import sample_completions
    from opd_jax.tasks import Prompter
    from opd_jax.tasks.domains import Example

    tok, verify = prep["tokenizer"], verifiers_for({}, [DOMAIN])[DOMAIN]
    examples = PromptSource([DOMAIN], seed=0).batch(0, n, stream=4)
    prompter = Prompter(tok)
    texts = sample_completions(model, prompter, examples, max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW,
                               temperature=1.0, key=jax.random.key(seed))
    first_err, after, cut = [], [], []
    for ex, t in zip(examples, texts):
        k = next((i for i, (a, b) in enumerate(zip(t, ex.answer)) if a != b), min(len(t), len(ex.answer)))
        if t == ex.answer:
            continue
        first_err.append(k / len(ex.answer))
        after.append(max(len(t) - k, 0) / max(len(t), 1))
        if ":" not in t[:k + 1]:  # the error is in the steps, not in the final sum: continue after it
            cut.append(Example(prompt=ex.prompt + t[:k + 1], answer=ex.answer, domain=DOMAIN))
    rec, shown = {}, [{"gold": ex.answer, "prefix": ex.prompt} for ex in cut[:6]]
    for name, m in (("teacher", load_model(prep["teacher"])), ("student", model)):
        if cut:
            cont = sample_completions(m, prompter, cut, max_prompt_len=MAX_PROMPT + MAX_NEW - 4, max_new_tokens=MAX_NEW - 4)
            rec[name] = float(np.mean([verify(c, ex.answer) for ex, c in zip(cut, cont)]))
            for row, c in zip(shown, cont):
                row[name] = c
    out = {"sample_accuracy": float(np.mean([verify(t, ex.answer) for ex, t in zip(examples, texts)])),
           "wrong_samples": len(first_err) / n, "first_error_position": float(np.mean(first_err)) if first_err else None,
           "tokens_after_first_error": float(np.mean(after)) if after else None,
           "recoverable": len(cut), "recovery_from_first_error": rec, "examples": shown}
    print(f"diagnose: T=1 sample accuracy {out['sample_accuracy']:.3f}, wrong samples {out['wrong_samples']:.2f}, first "
          f"error at {out['first_error_position'] or 0:.2f} of the answer, {out['tokens_after_first_error'] or 0:.2f} of "
          f"a wrong sample's tokens after it; continuing from just after the first error ({len(cut)} samples): "
          + ", ".join(f"{k} {v:.3f}" for k, v in rec.items()), flush=True)
    return out


def plot(results: dict, folder: Path = Path("docs/plots")):
    """Eval curves (mean over seeds) and final accuracy (mean ± std) per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(results["arms"])
    for arm in names:
        curves = [r["curve"] for r in results["arms"][arm]["runs"] if r.get("curve")]
        if curves:
            steps = [s for s, _ in curves[0]]
            a1.plot([0] + steps, [results["before"]] + list(np.mean([[v for _, v in c] for c in curves], 0)), marker="o",
                    label=arm)
    a1.set_xlabel("step")
    a1.set_ylabel("greedy accuracy (trainer's eval, mean of seeds)")
    a1.axhline(results["teacher"], color="gray", lw=0.5)
    a1.legend(fontsize=7)
    acc = [[r["accuracy"] for r in results["arms"][a]["runs"]] for a in names]
    a2.bar(range(len(names)), [np.mean(x) for x in acc], yerr=[np.std(x) for x in acc], capsize=3)
    a2.axhline(results["before"], color="gray", lw=0.5, ls="--")
    a2.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
    a2.set_ylabel(f"final greedy accuracy, 128 prompts ({len(acc[0])} seeds)")
    fig.tight_layout()
    fig.savefig(folder / "long_horizon.png", dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--val-seed", type=int, default=100)
    # a fresh AdamW without warm-up first knocks the warm-started student down (eval accuracy 0.45 -> 0.1-0.2
    # at step 20, 0 at lr 3e-3), which costs the on-policy arms most: their data is the student's own samples
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--student-steps", type=int, default=900)  # greedy accuracy about 0.45: room both ways
    ap.add_argument("--mistake-rate", type=float, default=0.3)
    ap.add_argument("--mistakes", choices=["all", "digits"], default="all")
    ap.add_argument("--work", default="runs/long_horizon")
    ap.add_argument("--out", default="docs/results_long_horizon.json")
    ap.add_argument("--plot", action="store_true", help="only redraw docs/plots/long_horizon.png from --out")
    ap.add_argument("--diagnose", action="store_true", help="only measure the start student's samples and the "
                    "teacher's recovery after the student's first error; add to --out's file")
    args = ap.parse_args()
    if args.plot:
        return plot(json.loads(Path(args.out).read_text()))
    work = Path(args.work)
    prep = prepare(work, args.teacher_steps, args.student_steps, args.mistake_rate, mistakes=args.mistakes)
    if args.diagnose:
        res = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        res["diagnose"] = {"start_student": diagnose(prep, load_model(prep["student"]))}
        Path(args.out).write_text(json.dumps(res, indent=2))
        return
    ns, nt = n_params(prep["student"]), n_params(prep["teacher"])
    results = {"args": vars(args), "teacher": prep["teacher_acc"], "before": prep["before"], "arms": {},
               "params": {"student": ns, "teacher": nt}}
    budget = args.steps * flops_per_step("off_fkl", ns, nt)  # off-policy KD's compute at the last step
    for arm in args.arms:
        lrs = {}
        for lr in args.lrs if len(args.lrs) > 1 else []:  # pick the arm's learning rate on the validation seed
            model, _ = run(prep, arm, work / f"{arm}_val_lr{lr:g}", steps=args.steps, seed=args.val_seed, lr=lr,
                           warmup=args.warmup)
            lrs[lr] = prep["acc"](model, prep["val_set"])
        lr = max(lrs, key=lrs.get) if lrs else args.lrs[0]
        runs = []
        for seed in args.seeds:
            model, secs = run(prep, arm, work / f"{arm}_s{seed}", steps=args.steps, seed=seed, lr=lr, warmup=args.warmup)
            curve = eval_curve(work / f"{arm}_s{seed}")
            runs.append({"seed": seed, "accuracy": prep["acc"](model), "seconds": round(secs, 1), "curve": curve,
                         "at_equal_compute": at_budget(curve, budget / flops_per_step(arm, ns, nt))})
            print(f"{arm} lr {lr:g} seed {seed}: accuracy {runs[-1]['accuracy']:.3f} ({secs:.0f} s)", flush=True)
        results["arms"][arm] = {"lr": lr, "validation": {f"{k:g}": v for k, v in lrs.items()}, "runs": runs,
                                "flops_per_step": flops_per_step(arm, ns, nt)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nteacher {results['teacher']:.3f}, student before {results['before']:.3f}, {args.steps} steps")
    print("| arm | lr (validation accuracy per lr) | accuracy at equal steps (± std over seeds) | FLOPs per step "
          "/ off-policy KD's | eval accuracy at off-policy KD's compute |\n| --- | --- | --- | --- | --- |")
    for arm, r in results["arms"].items():
        eq = [x["at_equal_compute"] for x in r["runs"] if x["at_equal_compute"] is not None]
        val = ", ".join(f"{k}: {v:.3f}" for k, v in r["validation"].items())
        print(f"| {arm} | {r['lr']:g} ({val}) | {summary([x['accuracy'] for x in r['runs']])} | "
              f"{r['flops_per_step'] / flops_per_step('off_fkl', ns, nt):.2f} | {summary(eq) if eq else '-'} |")
    plot(results)


if __name__ == "__main__":
    main()
