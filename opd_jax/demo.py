"""`opd-jax demo`: multi-teacher on-policy distillation on three synthetic tasks, on CPU, no downloads.

1. a character tokenizer and three verifiable domains (addition, reverse, sort);
2. one small teacher per domain, trained by SFT and cached (keyed by everything that shapes it);
3. a smaller student, briefly SFT-trained on all domains so it starts weak;
4. multi-teacher OPD (each prompt scored by its domain's teacher; exact forward KL over the vocabulary
   on the student's own samples, i.e. on-policy GKD with lambda = 1);
5. summary.json with per-domain greedy accuracy before / after and of each teacher, metrics, plots.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from opd_jax.config import Config, DataConfig, LossConfig, ModelSpec, OptimConfig, TeacherSpec, TrainConfig
from opd_jax.evaluate import greedy_accuracy
from opd_jax.models import ModelConfig, init_model, load_model, save_model
from opd_jax.sft import sft_train
from opd_jax.tasks import PromptSource, build_char_tokenizer
from opd_jax.export import load_run_model
from opd_jax.train import train

DOMAINS = ("addition", "reverse", "sort")
TEACHER = dict(vocab_size=64, hidden_size=96, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=24, max_position_embeddings=64)
STUDENT = dict(vocab_size=64, hidden_size=80, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=20, max_position_embeddings=64)
TEACHER_SFT = dict(addition=600, reverse=400, sort=400)
TEACHER_BATCH, TEACHER_LR = 32, 5e-3
STUDENT_SFT_STEPS, STUDENT_LR = 120, 3e-3
OPD_STEPS = 800
MAX_PROMPT, MAX_NEW = 16, 8


def cache_root() -> Path:
    return Path(os.environ.get("OPD_JAX_CACHE", Path.home() / ".cache" / "opd_jax"))


def teacher_key(domain: str) -> str:
    """Hash of everything that determines a teacher: model, SFT recipe, task generator, tokenizer."""
    from opd_jax.tasks import domains as dmod
    import inspect

    blob = json.dumps({"model": TEACHER, "steps": TEACHER_SFT[domain], "batch": TEACHER_BATCH, "lr": TEACHER_LR,
                       "domain": domain, "gen": inspect.getsource(dmod.DOMAINS[domain].make),
                       "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def get_teacher(domain: str, tokenizer, log) -> Path:
    folder = cache_root() / "demo_teachers" / f"{domain}-{teacher_key(domain)}"
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        log(f"  teacher {domain}: cached at {folder}")
        return folder
    log(f"  teacher {domain}: training ({TEACHER_SFT[domain]} SFT steps)")
    model = init_model(ModelConfig.for_family("qwen3", **TEACHER), seed=DOMAINS.index(domain))
    src = PromptSource([domain], seed=1000)
    sft_train(model, tokenizer, lambda s: [(e.prompt, e.answer) for e in src.batch(s, TEACHER_BATCH)],
              steps=TEACHER_SFT[domain], lr=TEACHER_LR, max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW,
              progress=f"teacher {domain}")
    tmp = folder.with_name(folder.name + ".tmp")
    save_model(model, tmp)
    tmp.rename(folder)  # a killed run never leaves a half-written cache entry
    return folder


def prepare(out: str | Path, log=print) -> dict:
    """Tokenizer, one teacher per domain (cached, copied to out/teachers) and the weak student
    (out/student_init). Returns the paths, the evaluation function and the accuracies."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(out / "tokenizer")
    log(f"[1/5] tasks {', '.join(DOMAINS)}; character tokenizer ({len(tokenizer)} tokens) -> {out / 'tokenizer'}")
    log("[2/5] teachers (one per domain)")
    teachers = {}
    for d in DOMAINS:  # a copy beside the run, so configs/demo.yaml can name it
        teachers[d] = out / "teachers" / d
        if teachers[d].exists():
            shutil.rmtree(teachers[d])
        shutil.copytree(get_teacher(d, tokenizer, log), teachers[d])

    log(f"[3/5] student ({STUDENT['hidden_size']} wide vs teachers' {TEACHER['hidden_size']}), "
        f"{STUDENT_SFT_STEPS} SFT steps so it starts weak")
    student = init_model(ModelConfig.for_family("qwen3", **STUDENT), seed=7)
    src = PromptSource(list(DOMAINS), seed=2000)
    sft_train(student, tokenizer, lambda s: [(e.prompt, e.answer) for e in src.batch(s, 16)],
              steps=STUDENT_SFT_STEPS, lr=STUDENT_LR, max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW,
              progress="student SFT")
    save_model(student, out / "student_init")

    eval_set = PromptSource(list(DOMAINS), seed=0).batch(0, 128, stream=1)
    acc = lambda m: greedy_accuracy(m, tokenizer, eval_set, max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW)
    teacher_acc = {d: acc(load_model(p))[d] for d, p in teachers.items()}
    before = acc(student)
    log(f"      teachers: {_fmt(teacher_acc)}")
    log(f"      student before OPD: {_fmt(before)}")
    return {"out": out, "tokenizer": tokenizer, "teachers": teachers, "student": out / "student_init",
            "accuracy": acc, "teacher_acc": teacher_acc, "before": before}


def opd_config(prep: dict, out_dir: str | Path, steps: int = OPD_STEPS, seed: int = 0) -> Config:
    """The demo's OPD stage as a config (experiments vary its loss / data fields)."""
    return Config(
        student=ModelSpec(path=str(prep["student"])),
        teachers=tuple(TeacherSpec(name=d, path=str(p)) for d, p in prep["teachers"].items()),
        routing={d: d for d in DOMAINS},
        data=DataConfig(domains=DOMAINS, tokenizer=str(prep["out"] / "tokenizer"), per_domain=16, group_size=1,
                        max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW, temperature=1.0),
        loss=LossConfig(estimator_type="full", kind="forward_kl"),
        optim=OptimConfig(name="adamw", lr=3e-3, schedule="cosine", warmup_steps=0, clip_norm=1.0),
        train=TrainConfig(steps=steps, seed=seed, out_dir=str(out_dir), checkpoint_every=max(steps // 2, 1),
                          eval_every=max(steps // 5, 1), eval_per_domain=64, log_every=10),
    )


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, log=print) -> dict:
    t0 = time.time()
    prep = prepare(out, log)
    out, teacher_acc, before, acc = prep["out"], prep["teacher_acc"], prep["before"], prep["accuracy"]
    n = OPD_STEPS if steps is None else steps
    log(f"[4/5] multi-teacher OPD, {n} steps: exact forward KL over the vocabulary on the student's own samples, "
        "each prompt scored by its domain's teacher")
    cfg = opd_config(prep, out / "opd", steps=n)
    if (out / "opd").exists():
        shutil.rmtree(out / "opd")  # the demo always starts its OPD run afresh
    train(cfg)
    after = acc(load_run_model(out / "opd"))

    summary = {"teachers": teacher_acc, "student_before": before, "student_after": after,
               "before_over_teacher": _ratio(before, teacher_acc), "after_over_teacher": _ratio(after, teacher_acc),
               "opd_steps": n, "seconds": round(time.time() - t0, 1), "out": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log("[5/5] results (greedy exact-match accuracy on 128 held-out prompts per domain)")
    log(f"      {'domain':<10} {'teacher':>8} {'before':>8} {'after':>8}")
    for d in DOMAINS:
        log(f"      {d:<10} {teacher_acc[d]:8.2f} {before[d]:8.2f} {after[d]:8.2f}")
    log(f"      student/teacher: before {summary['before_over_teacher']:.2f}x, after {summary['after_over_teacher']:.2f}x"
        f"  ({summary['seconds']:.0f} s)")
    log(f"      wrote {out / 'summary.json'}, {out / 'opd' / 'metrics.jsonl'}, plots in {out / 'opd' / 'plots'}")
    return summary


def _ratio(acc: dict, teacher: dict) -> float:
    t = sum(teacher[d] for d in DOMAINS)
    return sum(acc[d] for d in DOMAINS) / t if t else 0.0


def _fmt(acc: dict) -> str:
    return ", ".join(f"{d} {acc[d]:.2f}" for d in DOMAINS)
