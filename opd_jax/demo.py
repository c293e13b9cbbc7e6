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
# the teachers' SFT recipe: addition needs the most steps (600 steps of 32 rows gave 0.53 on a fresh cache
# and 0.80 on 8 fake devices; scripts/experiments/demo_teacher.py measured the recipe below, docs/results.md)
TEACHER_SFT = dict(addition=1000, reverse=500, sort=500)
TEACHER_BATCH, TEACHER_LR, TEACHER_WARMUP = 64, 5e-3, 100
# the code that trains a teacher: a change to any of these files (or to jax / flax / optax) retrains it
TEACHER_CODE = ("sft.py", "models", "losses/chunked.py", "losses/masking.py", "tasks/data.py", "tasks/domains.py",
                "tasks/tokenizer.py")
STUDENT_SFT_STEPS, STUDENT_LR = 120, 3e-3
OPD_STEPS = 800
MAX_PROMPT, MAX_NEW = 16, 8


def cache_root() -> Path:
    return Path(os.environ.get("OPD_JAX_CACHE", Path.home() / ".cache" / "opd_jax"))


def code_version(root: Path | None = None) -> str:
    """Hash of the source files that train a teacher (TEACHER_CODE, under `root`, default the opd_jax
    package) and the versions of the libraries whose numerics they use."""
    from importlib.metadata import version

    root = Path(__file__).resolve().parent if root is None else Path(root)
    h = hashlib.sha256()
    for name in TEACHER_CODE:
        for f in sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name]:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    for lib in ("jax", "jaxlib", "flax", "optax"):
        h.update(f"{lib}={version(lib)}".encode())
    return h.hexdigest()[:16]


def teacher_key(domain: str) -> str:
    """Hash of everything that trains a teacher: model shape, SFT recipe, domain, and the training code's
    version (`code_version`): a changed recipe or trainer retrains instead of reusing a stale cache."""
    blob = json.dumps({"model": TEACHER, "steps": TEACHER_SFT[domain], "batch": TEACHER_BATCH, "lr": TEACHER_LR,
                       "warmup": TEACHER_WARMUP, "domain": domain, "code": code_version(), "version": 2},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_teacher(domain: str, tokenizer, seed: int = 0, progress: bool = True):
    """The demo's teacher for `domain` (seed 0 is the demo's own; other seeds change the initialisation
    and the SFT data, for checking the recipe)."""
    model = init_model(ModelConfig.for_family("qwen3", **TEACHER), seed=DOMAINS.index(domain) + 100 * seed)
    src = PromptSource([domain], seed=1000 + seed)
    sft_train(model, tokenizer, lambda s: [(e.prompt, e.answer) for e in src.batch(s, TEACHER_BATCH)],
              steps=TEACHER_SFT[domain], lr=TEACHER_LR, warmup=TEACHER_WARMUP, max_prompt_len=MAX_PROMPT,
              max_new_tokens=MAX_NEW, progress=f"teacher {domain}" if progress else None)
    return model


def eval_examples():
    """The demo's held-out prompts: 128 per domain."""
    return PromptSource(list(DOMAINS), seed=0).batch(0, 128, stream=1)


def get_teacher(domain: str, tokenizer, log) -> Path:
    folder = cache_root() / "demo_teachers" / f"{domain}-{teacher_key(domain)}"
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        log(f"  teacher {domain}: cached at {folder}")
        return folder
    log(f"  teacher {domain}: training ({TEACHER_SFT[domain]} SFT steps)")
    model = train_teacher(domain, tokenizer)
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

    eval_set = eval_examples()
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
