"""On-policy self-distillation with privileged context (issue 25, part 3): with no external teacher, does
the student taught by itself-with-the-answer beat SFT and GRPO on the long-horizon `carry` task, at
equal steps and at equal compute?

Prompts, optimizer and evaluation as scripts/experiments/long_horizon.py (its mistake-trained teacher is
not used). OPSD needs a model that can read the privileged context, as the instruction-tuned models of
the paper can; a toy student has never seen an answer in its prompt (a first run, whose teacher saw
it at positions past the student's training, collapsed every OPSD run to 0). So the student here is
long_horizon's student shape with 128 positions, warm-started by 900 SFT steps on a mix: half the rows
plain (prompt -> gold), half privileged (TEMPLATE(prompt, answer) -> gold). Every arm starts from it.
100 steps, 32 rows a step, AdamW with 10 warm-up steps then cosine, clip 1, 3 seeds:

  sft_gold  SFT on the gold answers (long_horizon's arm; learning rate 3e-3, chosen there)
  grpo      group-normalised exact-match reward, 8 prompts x 4 samples (loss.rl_alpha 0, sampled
            estimator; 3e-4, the rate long_horizon chose for its sampled arms)
  opsd      teacher = the student's current weights (self_live) shown "{answer}.{prompt}", exact
            forward KL on the student's samples (3e-3, long_horizon's on-policy forward-KL rate)
  opsd_rkl  the same with reverse KL

FLOPs per step: 2 N T a forward pass, 6 N T forward + backward over T positions: SFT 6 N T per row;
GRPO and OPSD sample (2 N T) and update (6 N T); OPSD also runs the teacher forward over the longer
privileged row (2 N T'). Equal compute: each arm's eval curve (its own 64 prompts every 20 steps) read at
the FLOPs SFT spends in 100 steps.

    python scripts/experiments/opsd.py [--steps 100] [--seeds 0 1 2] [--task carry | demo]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import summary  # noqa: E402
from long_horizon import DOMAIN, MAX_NEW, MAX_PROMPT, at_budget, config, eval_curve, n_params, prepare, run as lh_run  # noqa: E402

from opd_jax.config import TeacherSpec  # noqa: E402
from opd_jax.export import load_run_model  # noqa: E402
from opd_jax.train import train  # noqa: E402

TEMPLATE = "{answer}.{prompt}"
PRIV_LEN = 64  # BOS + a carry answer (<= 39) + "." + the prompt (<= 18)
# --task demo: the demo's three domains (answers of 1-5 characters) and its student shape; the student's
# warm start sees 240 steps, half of them privileged rows (the demo's student gets 120 plain ones)
DEMO = dict(domains=("addition", "reverse", "sort"), max_prompt=16, max_new=8, priv_len=24, sft_steps=240,
            per_domain=16, grpo=dict(per_domain=4, group_size=4))
ARMS = {
    "sft_gold": dict(lr=3e-3),
    "grpo": dict(lr=3e-4, loss=dict(estimator_type="sampled", rl_alpha=0.0, rl_mode="mix"),
                 data=dict(per_domain=8, group_size=4)),
    "opsd": dict(lr=3e-3, loss=dict(estimator_type="full", kind="forward_kl"), privileged=True),
    "opsd_rkl": dict(lr=3e-3, loss=dict(estimator_type="full", kind="reverse_kl"), privileged=True),
    # control (not in the default arms): the frozen step-0 snapshot as the privileged teacher
    "opsd_frozen": dict(lr=3e-3, loss=dict(estimator_type="full", kind="forward_kl"), privileged=True, frozen=True),
}
DEFAULT_ARMS = ["sft_gold", "grpo", "opsd", "opsd_rkl"]


def flops_per_step(arm: str, n: int, rows: int = 32) -> float:
    t = MAX_PROMPT + MAX_NEW
    if arm == "sft_gold":
        return rows * 6.0 * n * t
    out = rows * (2.0 + 6.0) * n * t
    if ARMS[arm].get("privileged"):
        out += rows * 2.0 * n * (PRIV_LEN + MAX_NEW)
    return out


def opsd_student(prep, steps: int = 900):
    """The warm-start student that reads privileged context (module docstring), trained once."""
    from opd_jax.models import ModelConfig, init_model, load_model, save_model
    from opd_jax.sft import sft_train
    from opd_jax.tasks import PromptSource
    from long_horizon import STUDENT

    folder = prep["work"] / "student_opsd"
    if not (folder / "config.json").exists():
        model = init_model(ModelConfig.for_family("qwen3", **{**STUDENT, "max_position_embeddings": 128}), seed=7)
        src = PromptSource([DOMAIN], seed=2000)

        def pairs(step):
            exs = src.batch(step, 16)
            return [(TEMPLATE.format(prompt=e.prompt, answer=e.answer) if i % 2 else e.prompt, e.answer)
                    for i, e in enumerate(exs)]
        sft_train(model, prep["tokenizer"], pairs, steps=steps, lr=3e-3, max_prompt_len=PRIV_LEN,
                  max_new_tokens=MAX_NEW, progress="OPSD student SFT (half the rows privileged)")
        save_model(model, folder)
    return folder, load_model(folder)


def run(prep, arm: str, out_dir: Path, *, steps: int, seed: int, lr: float | None = None):
    spec = {**ARMS[arm], **({"lr": lr} if lr else {})}
    if arm == "sft_gold":
        return lh_run(prep, "sft_gold", out_dir, steps=steps, seed=seed, lr=spec["lr"])
    t0 = time.time()
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = config(prep, out_dir, steps=steps, seed=seed, lr=spec["lr"], loss=spec["loss"], warmup=10)
    data = dataclasses.replace(cfg.data, **spec.get("data", {}), max_privileged_len=PRIV_LEN)
    teachers = (TeacherSpec(name="self", path="self" if spec.get("frozen") else "self_live", privileged="answer",
                            privileged_template=TEMPLATE),)
    cfg = dataclasses.replace(cfg, data=data, teachers=teachers if spec.get("privileged") else cfg.teachers,
                              routing={DOMAIN: "self"} if spec.get("privileged") else cfg.routing)
    train(cfg)
    return load_run_model(out_dir), time.time() - t0


def privileged_accuracy(prep, model) -> float:
    """Greedy accuracy of `model` as the OPSD teacher sees the task: prompted with TEMPLATE (the answer
    in front), on the 128 held-out prompts. High means the privileged self knows the answer."""
    from opd_jax.evaluate import greedy_accuracy
    from opd_jax.tasks import PromptSource, verifiers_for
    from opd_jax.tasks.domains import Example

    exs = [Example(TEMPLATE.format(prompt=e.prompt, answer=e.answer), e.answer, DOMAIN)
           for e in PromptSource([DOMAIN], seed=0).batch(0, 128, stream=1)]
    return greedy_accuracy(model, prep["tokenizer"], exs, max_prompt_len=PRIV_LEN, max_new_tokens=MAX_NEW,
                           verifiers=verifiers_for({}, [DOMAIN]))[DOMAIN]


def demo_main(args):
    """--task demo: the same arms on the demo's domains, from a demo-shaped student warm-started on
    half-privileged rows (DEMO)."""
    from opd_jax.config import Config, DataConfig, LossConfig, ModelSpec, OptimConfig, TrainConfig
    from opd_jax.demo import STUDENT as DEMO_STUDENT
    from opd_jax.evaluate import greedy_accuracy
    from opd_jax.models import ModelConfig, init_model, load_model, save_model
    from opd_jax.sft import sft_train
    from opd_jax.tasks import PromptSource, build_char_tokenizer
    from opd_jax.tasks.domains import Example

    d = DEMO
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(work / "tokenizer")
    eval_set = PromptSource(d["domains"], seed=0).batch(0, 128, stream=1)

    def acc(model, privileged=False):
        exs = [Example(TEMPLATE.format(prompt=e.prompt, answer=e.answer), e.answer, e.domain) for e in eval_set] \
            if privileged else eval_set
        return greedy_accuracy(model, tok, exs, max_prompt_len=d["priv_len"] if privileged else d["max_prompt"],
                               max_new_tokens=d["max_new"])["mean"]

    folder = work / "student_opsd"
    if not (folder / "config.json").exists():
        model = init_model(ModelConfig.for_family("qwen3", **DEMO_STUDENT), seed=7)
        src = PromptSource(d["domains"], seed=2000)
        sft_train(model, tok, lambda step: [(TEMPLATE.format(prompt=e.prompt, answer=e.answer) if i % 2 else e.prompt,
                                             e.answer) for i, e in enumerate(src.batch(step, 16))],
                  steps=d["sft_steps"], lr=3e-3, max_prompt_len=d["priv_len"], max_new_tokens=d["max_new"],
                  progress="OPSD demo student SFT (half the rows privileged)")
        save_model(model, folder)
    start = load_model(folder)
    results = {"args": vars(args), "before": acc(start), "privileged_before": acc(start, True), "arms": {}}
    print(f"OPSD demo student: greedy {results['before']:.3f}, with the answer in its prompt "
          f"{results['privileged_before']:.3f}", flush=True)
    for arm in args.arms:
        spec = {**ARMS[arm], **({"lr": args.lr} if args.lr else {})}
        runs = []
        for seed in args.seeds:
            t0 = time.time()
            out = work / f"opsd_demo_{arm}_s{seed}"
            shutil.rmtree(out, ignore_errors=True)
            if arm == "sft_gold":
                model = load_model(folder)
                src = PromptSource(d["domains"], seed=seed)
                sft_train(model, tok, lambda step: [(e.prompt, e.answer) for e in src.batch(step, d["per_domain"])],
                          steps=args.steps, lr=spec["lr"], max_prompt_len=d["max_prompt"], max_new_tokens=d["max_new"],
                          warmup=10)
            else:
                data = {"per_domain": d["per_domain"], "group_size": 1, **(d["grpo"] if arm == "grpo" else {})}
                priv = spec.get("privileged")
                cfg = Config(
                    student=ModelSpec(path=str(folder)),
                    teachers=(TeacherSpec(name="self", path="self" if spec.get("frozen") else "self_live",
                                          privileged="answer" if priv else "", privileged_template=TEMPLATE),),
                    routing={dm: "self" for dm in d["domains"]},
                    data=DataConfig(domains=d["domains"], tokenizer=str(work / "tokenizer"), max_prompt_len=d["max_prompt"],
                                    max_new_tokens=d["max_new"], temperature=1.0, max_privileged_len=d["priv_len"],
                                    **data),
                    loss=LossConfig(**spec["loss"]),
                    optim=OptimConfig(name="adamw", lr=spec["lr"], schedule="cosine", warmup_steps=10, clip_norm=1.0),
                    train=TrainConfig(steps=args.steps, seed=seed, out_dir=str(out), checkpoint_every=args.steps,
                                      eval_every=max(args.steps // 5, 1), eval_per_domain=32, log_every=10,
                                      progress=False))
                train(cfg)
                model = load_run_model(out)
            runs.append({"seed": seed, "accuracy": acc(model), "privileged_accuracy": acc(model, True),
                         "seconds": round(time.time() - t0, 1)})
            print(f"demo {arm} seed {seed}: accuracy {runs[-1]['accuracy']:.3f}, with the answer in the prompt "
                  f"{runs[-1]['privileged_accuracy']:.3f} ({runs[-1]['seconds']:.0f} s)", flush=True)
        results["arms"][arm] = {"lr": spec["lr"], "runs": runs}
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\ndemo student before {results['before']:.3f} (with the answer {results['privileged_before']:.3f})")
    print("| arm | lr | accuracy (± std) | with the answer in the prompt |\n| --- | --- | --- | --- |")
    for arm, r in results["arms"].items():
        print(f"| {arm} | {r['lr']:g} | {summary([x['accuracy'] for x in r['runs']])} | "
              f"{summary([x['privileged_accuracy'] for x in r['runs']])} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    ap.add_argument("--lr", type=float, default=None, help="one learning rate for every arm (default: each arm's)")
    ap.add_argument("--work", default="runs/long_horizon")
    ap.add_argument("--out", default=None, help="default docs/results_opsd.json (--task demo: "
                    "docs/results_opsd_demo.json)")
    ap.add_argument("--task", choices=["carry", "demo"], default="carry")
    args = ap.parse_args()
    if args.out is None:
        args.out = "docs/results_opsd.json" if args.task == "carry" else "docs/results_opsd_demo.json"
    if args.task == "demo":
        if args.work == "runs/long_horizon":
            args.work = "runs/opsd_demo"
        return demo_main(args)
    work = Path(args.work)
    prep = prepare(work, 1500, 900, 0.3)
    prep["student"], start = opsd_student(prep)
    prep["before"] = prep["acc"](start)
    prep["privileged_before"] = privileged_accuracy(prep, start)
    print(f"OPSD start student: greedy {prep['before']:.3f}, with the answer in its prompt "
          f"{prep['privileged_before']:.3f}", flush=True)
    n = n_params(prep["student"])
    budget = args.steps * flops_per_step("sft_gold", n)
    results = {"args": vars(args), "before": prep["before"], "privileged_before": prep["privileged_before"],
               "arms": {}}
    for arm in args.arms:
        runs = []
        for seed in args.seeds:
            folder = work / f"opsd_{arm}{'' if args.lr is None else f'_lr{args.lr:g}'}_s{seed}"
            model, secs = run(prep, arm, folder, steps=args.steps, seed=seed, lr=args.lr)
            curve = eval_curve(folder)
            runs.append({"seed": seed, "accuracy": prep["acc"](model), "seconds": round(secs, 1), "curve": curve,
                         "privileged_accuracy": privileged_accuracy(prep, model),
                         "at_equal_compute": at_budget(curve, budget / flops_per_step(arm, n))})
            print(f"{arm} seed {seed}: accuracy {runs[-1]['accuracy']:.3f}, with the answer in the prompt "
                  f"{runs[-1]['privileged_accuracy']:.3f} ({secs:.0f} s)", flush=True)
        results["arms"][arm] = {"lr": args.lr or ARMS[arm]["lr"], "runs": runs, "flops_per_step": flops_per_step(arm, n)}
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nstudent before {results['before']:.3f}, {args.steps} steps")
    print("| arm | lr | accuracy at equal steps (± std, 3 seeds) | FLOPs per step / SFT's | trainer-eval accuracy "
          "at SFT's 100-step FLOPs |\n| --- | --- | --- | --- | --- |")
    for arm, r in results["arms"].items():
        eq = [x["at_equal_compute"] for x in r["runs"] if x["at_equal_compute"] is not None]
        print(f"| {arm} | {r['lr']:g} | {summary([x['accuracy'] for x in r['runs']])} | "
              f"{r['flops_per_step'] / flops_per_step('sft_gold', n):.2f} | {summary(eq) if eq else '-'} |")


if __name__ == "__main__":
    main()
