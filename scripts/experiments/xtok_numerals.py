"""Cross-tokenizer distillation, the numeral case (issue 26) at toy scale: a character-level teacher and a
BPE student whose vocabulary merges digit runs, on the demo's addition task ("add:47+8=" -> "55").

GOLD's ULD treats a student numeral token ("55") that the teacher's vocabulary lacks as unmatched: it
gets only the sorted-L1 term. Byte-prefix marginalisation (bpm) moves the teacher's "5" onto the student's
longest token that prefixes it, the student's "5" (the merged "55" has no teacher mass). Arms, 3 seeds:

  same  a teacher trained with the student's own BPE tokenizer (same recipe): same-tokenizer OPD
  bpm   the character teacher, loss.cross_tokenizer bpm
  uld   the character teacher, loss.cross_tokenizer uld
  chars control: a character-level student (same shape and warm start, in characters) taught by the
        character teacher, same-tokenizer; it separates the student's tokenization from the teacher's
  bpm_rev, uld_rev  the other direction: the character student taught by the BPE teacher (a merged
        teacher token such as "55" starts where a student token does, but the student's next "5" starts
        inside it: only some student positions align)

Everything else as the demo's OPD stage: exact forward KL on the student's samples, AdamW 3e-3 cosine,
16 prompts a step; teachers 96 wide (2000 SFT steps each), the student 80 wide warm-started by 150
SFT steps on its BPE tokens.
Accuracy: greedy exact match on 256 held-out prompts.

    python scripts/experiments/xtok_numerals.py [--steps 400] [--seeds 0 1 2] [--work runs/xtok_numerals]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import summary  # noqa: E402

from opd_jax.config import Config, DataConfig, LossConfig, ModelSpec, OptimConfig, TeacherSpec, TrainConfig  # noqa: E402
from opd_jax.demo import MAX_NEW, MAX_PROMPT, STUDENT, TEACHER, TEACHER_BATCH, TEACHER_LR  # noqa: E402
from opd_jax.evaluate import greedy_accuracy  # noqa: E402
from opd_jax.export import load_run_model  # noqa: E402
from opd_jax.models import ModelConfig, init_model, load_model, save_model  # noqa: E402
from opd_jax.sft import sft_train  # noqa: E402
from opd_jax.tasks import PromptSource, build_char_tokenizer, load_tokenizer  # noqa: E402
from opd_jax.tasks.tokenizer import build_bpe_tokenizer  # noqa: E402
from opd_jax.train import train  # noqa: E402

DOMAIN = "addition"
TEACHER_STEPS = dict(chars=2000, bpe=2000)  # the demo's 600 left the BPE teacher at 0.36 (2026-12-03 run)
STUDENT_STEPS = 150
BPE_VOCAB = 120


def prepare(work: Path) -> dict:
    """Tokenizers, both teachers and the warm-start student (each made once, then read back)."""
    work.mkdir(parents=True, exist_ok=True)
    chars = build_char_tokenizer(work / "tok_chars")
    if not (work / "tok_bpe" / "tokenizer.json").exists():
        src = PromptSource([DOMAIN], seed=5000)
        # prompts and answers apart, as they are tokenized: merges join digit runs of the answers
        corpus = [x for s in range(200) for e in src.batch(s, 32) for x in (e.prompt, e.answer)]
        build_bpe_tokenizer(work / "tok_bpe", corpus, BPE_VOCAB)
    bpe = load_tokenizer(work / "tok_bpe")

    def model(name, shape, tok, steps, seed, lr=TEACHER_LR):
        folder = work / name
        if not (folder / "config.json").exists():
            m = init_model(ModelConfig.for_family("qwen3", **{**shape, "vocab_size": 128}), seed=seed)
            src = PromptSource([DOMAIN], seed=seed + 1000)
            sft_train(m, tok, lambda s: [(e.prompt, e.answer) for e in src.batch(s, TEACHER_BATCH)], steps=steps,
                      lr=lr, max_prompt_len=MAX_PROMPT,
                      max_new_tokens=MAX_NEW, progress=f"{name} SFT")
            save_model(m, folder)
            tok.save_pretrained(str(folder))
        return folder

    prep = {"work": work, "chars": chars, "bpe": bpe,
            "teacher_chars": model("teacher_chars", TEACHER, chars, TEACHER_STEPS["chars"], 0),
            "teacher_bpe": model("teacher_bpe", TEACHER, bpe, TEACHER_STEPS["bpe"], 0),
            "student": model("student_bpe", STUDENT, bpe, STUDENT_STEPS, 3, lr=3e-3),
            "student_chars": model("student_chars", STUDENT, chars, STUDENT_STEPS, 3, lr=3e-3)}
    evals = PromptSource([DOMAIN], seed=0).batch(0, 256, stream=1)

    def acc(m, tok):
        return greedy_accuracy(m, tok, evals, max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW)[DOMAIN]
    prep["acc"] = acc
    return prep


def config(prep, arm: str, out: Path, steps: int, seed: int) -> Config:
    rev = arm.endswith("_rev")
    teacher = prep["teacher_bpe"] if arm == "same" or rev else prep["teacher_chars"]
    char_student = arm == "chars" or rev
    tok = "tok_chars" if char_student else "tok_bpe"
    return Config(
        student=ModelSpec(path=str(prep["student_chars" if char_student else "student"])),
        teachers=(TeacherSpec(name="t", path=str(teacher), max_prompt_len=2 * MAX_PROMPT, max_new_tokens=2 * MAX_NEW),),
        routing={DOMAIN: "t"},
        data=DataConfig(domains=(DOMAIN,), tokenizer=str(prep["work"] / tok), per_domain=16, group_size=1,
                        max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW, temperature=1.0),
        loss=LossConfig(estimator_type="full", kind="forward_kl",
                        cross_tokenizer=arm.split("_")[0] if arm.split("_")[0] in ("bpm", "uld") else ""),
        optim=OptimConfig(name="adamw", lr=3e-3, schedule="cosine", clip_norm=1.0),
        train=TrainConfig(steps=steps, seed=seed, out_dir=str(out), checkpoint_every=steps,
                          eval_every=max(steps // 4, 1), eval_per_domain=64, log_every=10, progress=False))


def sampled_tokens(recs) -> float:
    """Mean sampled completion length in the student's tokens (EOS included) over the last 5 log records."""
    lens = [r["rollout/mean_length"] for r in recs if "rollout/mean_length" in r]
    return float(np.mean(lens[-5:])) if lens else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=["same", "bpm", "uld", "chars", "bpm_rev", "uld_rev"])
    ap.add_argument("--work", default="runs/xtok_numerals")
    ap.add_argument("--out", default="docs/results_xtok.json")
    args = ap.parse_args()
    prep = prepare(Path(args.work))
    bpe, chars = prep["bpe"], prep["chars"]
    merged = [t for t in bpe.convert_ids_to_tokens(list(range(len(bpe)))) if len(t) > 1 and t.isdigit()]
    res = {"args": vars(args), "bpe_digit_tokens": len(merged),
           "teacher_chars": prep["acc"](load_model(prep["teacher_chars"]), chars),
           "teacher_bpe": prep["acc"](load_model(prep["teacher_bpe"]), bpe),
           "student_before": prep["acc"](load_model(prep["student"]), bpe),
           "student_chars_before": prep["acc"](load_model(prep["student_chars"]), chars), "arms": {}}
    print(f"BPE vocabulary {len(bpe)} with {len(merged)} multi-digit tokens (e.g. {merged[:6]}); teachers: "
          f"characters {res['teacher_chars']:.3f}, BPE {res['teacher_bpe']:.3f}; student before "
          f"{res['student_before']:.3f}", flush=True)
    for arm in args.arms:
        runs = []
        for seed in args.seeds:
            out = Path(args.work) / f"{arm}_s{seed}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.time()
            train(config(prep, arm, out, args.steps, seed))
            recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            model = load_run_model(out)
            runs.append({"seed": seed, "accuracy": prep["acc"](model, chars if arm == "chars" or "_rev" in arm else bpe),
                         "seconds": round(time.time() - t0, 1),
                         "aligned_fraction": float(np.mean([r["xtok/aligned_fraction"] for r in recs
                                                            if "xtok/aligned_fraction" in r] or [1.0])),
                         "residual_mass": float(np.mean([r["on_policy/residual_mass"] for r in recs
                                                         if "on_policy/residual_mass" in r] or [0.0])),
                         # the student's own sampled tokens per completion (EOS included), last 50 steps
                         "tokens_per_answer": sampled_tokens(recs),
                         "final_divergence": recs[-1].get("on_policy/divergence")})
            print(f"{arm} seed {seed}: accuracy {runs[-1]['accuracy']:.3f}, aligned "
                  f"{runs[-1]['aligned_fraction']:.2f}, tokens per answer {runs[-1]['tokens_per_answer']:.2f} "
                  f"({runs[-1]['seconds']:.0f} s)", flush=True)
        res["arms"][arm] = runs
        Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\n| arm | accuracy (± std, {len(args.seeds)} seeds) | aligned positions | sampled tokens per answer |")
    print("| --- | --- | --- | --- |")
    for arm, runs in res["arms"].items():
        print(f"| {arm} | {summary([r['accuracy'] for r in runs])} | "
              f"{np.mean([r['aligned_fraction'] for r in runs]):.2f} | "
              f"{np.mean([r['tokens_per_answer'] for r in runs]):.2f} |")


if __name__ == "__main__":
    main()
