"""The real-model experiments (issue 33) on SmolLM2-135M-Instruct, its 24-layer pruned copy and the
chat domains `capital` and `sum_digits` (training prompts and held-out evaluation prompts are disjoint:
even / odd countries, 75 / 25 digit pairs).

Experiments (each arm writes WORK/<arm>/result.json; an arm with a result is skipped, so the queue
resumes after a crash):

  prune     student = the 24-layer copy, teacher = the full model. Arms at equal rows per step
            (8 prompts x 40 new tokens, 30 steps, AdamW lr 5e-5, 3 warm-up steps):
              on_fkl   on-policy, exact forward KL over the full vocabulary
              on_rkl   on-policy, sampled-token reverse KL (OPD+ estimator)
              off_kd   supervised KD: exact forward KL on teacher-generated answers (loss.lam = 0)
              gkd      GKD lambda = 0.5 (4 on-policy + 4 teacher-answer rows a step)
              sft      SFT on the same teacher-generated answers
  context   student = the full model, teacher = the full model with "Always answer in French." after
            every prompt (teachers[].privileged: context); arms ctx_opd (on-policy forward KL) and ctx_sft
            (SFT on the prompted teacher's samples)
  mask      on_fkl again with optim.mask = the 10% largest |update| coordinates of on_fkl (mask_fkl), and
            with SGD (sgd_fkl)
  effopd    on_fkl with the EffOPD line search every 5 steps (eff_fkl)

Every arm's final student is measured the same way on 48 held-out prompts (24 a domain): greedy
accuracy (verifiers contains / last_number), the stop rate of its samples at temperature 1 (a stop id
within the budget), forward and reverse KL to the teacher per token on its own samples and on the
teacher's samples, French rate (langdetect, context arms). Teacher forward tokens are counted per arm.

    python scripts/experiments/real_model.py --arms on_fkl off_kd ... [--seed 0] [--work runs/real]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.config import load_config
from opd_jax.evaluate import decode_completions, rewards_for
from opd_jax.export import restore_run_params
from opd_jax.models import load_model
from opd_jax.engine import generate
from opd_jax.sft import sft_train
from opd_jax.tasks import Example, Prompter, PromptSource, load_tokenizer, stop_ids, verifiers_for
from opd_jax.train import train

FULL = Path(os.environ.get("OPD_SMOLLM2", Path.home() / ".cache/opd_jax/models/smollm2-135m-instruct"))
PRUNED = Path(os.environ.get("OPD_SMOLLM2_24", "runs/smollm2-24"))
DOMAINS = ["capital", "sum_digits"]
STEPS, PER_DOMAIN, MAX_PROMPT, MAX_NEW, LR, WARMUP = 30, 4, 64, 40, 5e-5, 3
FRENCH = "{prompt} Always answer in French."
EVAL_PER_DOMAIN = 24

ARMS = {
    "on_fkl": dict(loss={"estimator_type": "full", "kind": "forward_kl"}),
    "on_rkl": dict(loss={"estimator_type": "sampled", "kind": "reverse_kl", "estimator": "opd_plus"}),
    "off_kd": dict(loss={"estimator_type": "full", "kind": "forward_kl", "lam": 0.0}, answers=True),
    "gkd": dict(loss={"estimator_type": "full", "kind": "forward_kl", "lam": 0.5}, answers=True, per_domain=2),
    "sft": dict(sft=True),
    "ctx_opd": dict(loss={"estimator_type": "full", "kind": "forward_kl"}, context=True),
    "ctx_sft": dict(sft=True, context=True),
    "mask_fkl": dict(loss={"estimator_type": "full", "kind": "forward_kl"}, mask_from="on_fkl"),
    "sgd_fkl": dict(loss={"estimator_type": "full", "kind": "forward_kl"}, optim={"name": "sgd", "lr": 0.05}),
    "eff_fkl": dict(loss={"estimator_type": "full", "kind": "forward_kl"},
                    optim={"effopd_window": 5, "effopd_line_search": True, "effopd_probe_per_domain": 4}),
}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ------------------------------------------------------------------ sampling and measurement
def sample_rows(model, prompter, examples, key, temperature, stop):
    """Completions of `examples` -> host (tokens [B, P+N], prompt mask [B, P], completion mask [B, N])."""
    ids, pmask = prompter.encode(examples, MAX_PROMPT)
    roll = generate(model, ids, pmask, key=key, max_new_tokens=MAX_NEW, temperature=temperature, eos_id=list(stop),
                    pad_id=prompter.tokenizer.pad_token_id or 0)
    return np.asarray(roll.tokens), np.asarray(pmask), np.asarray(roll.mask)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens, mask):
    return nnx.merge(graphdef, state)(tokens, attention_mask=mask)


@jax.jit
def _kl_rows(s_logits, t_logits, mask):
    s, t = jax.nn.log_softmax(s_logits, -1), jax.nn.log_softmax(t_logits, -1)
    fkl = (jnp.exp(t) * (t - s)).sum(-1)
    rkl = (jnp.exp(s) * (s - t)).sum(-1)
    return (fkl * mask).sum(), (rkl * mask).sum(), mask.sum()


def kl_to_teacher(student, teacher, s_rows, t_rows=None, chunk=8):
    """Per-token forward KL(teacher || student) and reverse KL over the completion positions.
    s_rows: what the student reads; t_rows: what the teacher reads (same completion, maybe another prompt)."""
    t_rows = t_rows or s_rows
    f = r = n = 0.0
    for i in range(0, s_rows[0].shape[0], chunk):
        outs = []
        for model, (tok, pm, m) in ((student, s_rows), (teacher, t_rows)):
            tok, pm, m = tok[i:i + chunk], pm[i:i + chunk], m[i:i + chunk]
            p = pm.shape[1]
            logits = _logits(*nnx.split(model), jnp.asarray(tok), jnp.asarray(np.concatenate([pm, m], 1)))
            outs.append(logits[:, p - 1:-1])  # position p-1+j predicts completion token j
        a, b, c = _kl_rows(outs[0], outs[1], jnp.asarray(s_rows[2][i:i + chunk], jnp.float32))
        f, r, n = f + float(a), r + float(b), n + float(c)
    return f / n, r / n


def french_rate(texts) -> float:
    from langdetect import DetectorFactory, detect_langs

    DetectorFactory.seed = 0
    hits = 0
    for t in texts:
        try:
            langs = detect_langs(t) if t.strip() else []
        except Exception:  # langdetect raises on text without letters
            langs = []
        hits += any(lang.lang == "fr" and lang.prob > 0.5 for lang in langs)
    return hits / len(texts)


def swap_rows(prompter_to, examples, rows):
    """The same completions behind another rendering of the prompts."""
    ids, pmask = prompter_to.encode(examples, MAX_PROMPT)
    _, pm_old, m = rows
    return (np.concatenate([ids, rows[0][:, pm_old.shape[1]:]], 1), pmask, m)


def measure(student, teacher, tok, stop, *, context: bool) -> dict:
    plain = Prompter(tok, chat_template=True)
    tprompt = FrenchPrompter(tok) if context else plain
    ex = PromptSource(DOMAINS).batch(0, EVAL_PER_DOMAIN, stream=1)
    verify = verifiers_for({}, DOMAINS)
    g = sample_rows(student, plain, ex, jax.random.key(0), 0.0, stop)
    texts = decode_completions(tok, g[0][:, MAX_PROMPT:], g[2], stop)
    rew = rewards_for(ex, texts, verify)
    s = sample_rows(student, plain, ex, jax.random.key(1), 1.0, stop)
    s_texts = decode_completions(tok, s[0][:, MAX_PROMPT:], s[2], stop)
    t = sample_rows(teacher, tprompt, ex, jax.random.key(2), 1.0, stop)
    ended = lambda rows: float(np.mean([m.sum() > 0 and int(tk[MAX_PROMPT + m.sum() - 1]) in stop  # noqa: E731
                                        for tk, m in zip(rows[0], rows[2])]))
    fo, ro = kl_to_teacher(student, teacher, s, swap_rows(tprompt, ex, s) if context else None)
    ft, rt = kl_to_teacher(student, teacher, swap_rows(plain, ex, t) if context else t, t)
    out = {"accuracy": {d: float(rew[[e.domain == d for e in ex]].mean()) for d in DOMAINS},
           "stop_rate": ended(s), "mean_len": float(s[2].sum(1).mean()),
           "fkl_own": fo, "rkl_own": ro, "fkl_teacher_samples": ft, "rkl_teacher_samples": rt,
           "greedy_examples": texts[:3] + texts[EVAL_PER_DOMAIN:EVAL_PER_DOMAIN + 3]}
    out["accuracy"]["mean"] = float(np.mean([out["accuracy"][d] for d in DOMAINS]))
    if context:
        out["french_greedy"] = french_rate(texts)
        out["french_sampled"] = french_rate(s_texts)
        out["french_teacher_sampled"] = french_rate(decode_completions(tok, t[0][:, MAX_PROMPT:], t[2], stop))
    return out


class FrenchPrompter(Prompter):
    """The chat template with the instruction after each prompt (what the context teacher reads)."""

    def __init__(self, tok):
        super().__init__(tok, chat_template=True)

    def _messages(self, ex):
        return super()._messages(dataclasses.replace(ex, prompt=FRENCH.format(prompt=ex.prompt)))


# ------------------------------------------------------------------ teacher answers (off-policy arms)
def teacher_answers(work: Path, teacher, tok, stop, *, context: bool, seed: int) -> Path:
    """Teacher samples (temperature 1) for STEPS x PER_DOMAIN training prompts a domain, as prompt records
    with the teacher's text as the answer; the plain prompt is recorded (the student never sees the
    instruction)."""
    path = work / f"teacher_answers_{'fr' if context else 'plain'}_s{seed}.jsonl"
    if path.exists():
        return path
    src = PromptSource(DOMAINS, seed=seed)
    ex = [e for s in range(STEPS) for e in src.batch(s, PER_DOMAIN)]
    prompter = FrenchPrompter(tok) if context else Prompter(tok, chat_template=True)
    rows = sample_rows(teacher, prompter, ex, jax.random.key(100 + seed), 1.0, stop)
    texts = decode_completions(tok, rows[0][:, MAX_PROMPT:], rows[2], stop)
    work.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": e.prompt, "domain": e.domain, "answer": t}) + "\n"
                            for e, t in zip(ex, texts)))
    log(f"teacher answers: {path} ({len(ex)} rows, mean {rows[2].sum(1).mean():.1f} tokens)")
    return path


def full_model():
    """(tokenizer, stop ids, model) of the full SmolLM2 folder."""
    tok = load_tokenizer(FULL)
    return tok, tuple(stop_ids(tok, FULL)), load_model(FULL)


# ------------------------------------------------------------------ one arm
def config(out: Path, seed: int, spec: dict, answers: Path | None, student: Path):
    teacher = {"name": "full", "path": str(FULL)}
    if spec.get("context"):
        teacher.update(privileged="context", privileged_template=FRENCH)
    cfg = load_config("configs/smollm2_prune_recover.yaml", [
        f"student.path={student}", f"teachers=[{json.dumps(teacher)}]", f"train.out_dir={out}", f"train.seed={seed}",
        f"train.steps={STEPS}", f"train.eval_every={STEPS}", "train.eval_per_domain=4", "train.progress=false",
        f"train.checkpoint_every={STEPS}", f"data.max_new_tokens={MAX_NEW}", f"data.max_prompt_len={MAX_PROMPT}",
        f"data.per_domain={spec.get('per_domain', PER_DOMAIN)}", f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}"])
    if spec.get("answers"):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(answers), domains=()))
    for sec in ("loss", "optim"):
        if sec in spec:
            cfg = dataclasses.replace(cfg, **{sec: dataclasses.replace(getattr(cfg, sec), **spec[sec])})
    return cfg


def run_arm(name: str, seed: int, work: Path) -> dict:
    spec = dict(ARMS[name])
    out = work / f"{name}_s{seed}"
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    t0 = time.time()
    ctx = bool(spec.get("context"))
    student_dir = FULL if ctx else PRUNED
    tok, stop, teacher = full_model()
    answers = None
    if spec.get("answers") or spec.get("sft"):
        answers = teacher_answers(work, teacher, tok, stop, context=ctx, seed=seed)
    record = {"arm": name, "seed": seed, "steps": STEPS, "rows_per_step": 2 * PER_DOMAIN, "lr": LR,
              "student": str(student_dir)}
    if spec.get("sft"):
        student = load_model(student_dir)
        pairs = [json.loads(x) for x in answers.read_text().splitlines()]
        prompter = Prompter(tok, chat_template=True)
        batches = lambda s: [(Example(p["prompt"], None, p["domain"]), p["answer"])  # noqa: E731
                             for p in pairs[s * 2 * PER_DOMAIN:(s + 1) * 2 * PER_DOMAIN]]
        losses = sft_train(student, prompter, batches, steps=STEPS, lr=LR, warmup=WARMUP, max_prompt_len=MAX_PROMPT,
                           max_new_tokens=MAX_NEW, seed=seed)
        record["sft_loss"] = [round(x, 4) for x in losses]
        record["teacher_tokens"] = "generation only"
    else:
        if spec.get("mask_from"):
            spec.setdefault("optim", {})["mask"] = str(mask_for(work / f"{spec['mask_from']}_s{seed}", work))
        cfg = config(out, seed, spec, answers, student_dir)
        train(cfg)
        graphdef, params, _ = restore_run_params(out)
        student = nnx.merge(graphdef, params)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        record["curve"] = [{k: r[k] for k in r if k in ("step", "loss", "on_policy/divergence", "eos_rate",
                                                        "rollout/mean_len", "grad_norm")} for r in recs]
    record.update(measure(student, teacher, tok, stop, context=ctx))
    record["seconds"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"{name} s{seed}: acc {record['accuracy']} fKL own {record['fkl_own']:.3f} teacher-samples "
        f"{record['fkl_teacher_samples']:.3f} stop {record['stop_rate']:.2f} ({record['seconds']} s)")
    return record


def mask_for(run: Path, work: Path) -> Path:
    """The 10% largest-|update| coordinates of `run`'s final student against its start (optim.mask file)."""
    from opd_jax.optim.masks import mask_from_update, save_mask

    path = work / f"mask_{run.name}.safetensors"
    if not path.exists():
        _, after, _ = restore_run_params(run)
        before = nnx.to_pure_dict(nnx.split(load_model(PRUNED))[1])
        delta = jax.tree.map(lambda x, y: np.asarray(x, np.float32) - np.asarray(y, np.float32), after, before)
        save_mask(mask_from_update(delta, 0.1), path)
    return path


def baseline(work: Path) -> dict:
    """The untrained students measured the same way (prune: the 24-layer copy; context: the full model)."""
    out = work / "baseline.json"
    if out.exists():
        return json.loads(out.read_text())
    tok, stop, teacher = full_model()
    res = {"pruned": measure(load_model(PRUNED), teacher, tok, stop, context=False),
           "full_vs_context_teacher": measure(teacher, teacher, tok, stop, context=True)}
    res["teacher_alone"] = measure(teacher, teacher, tok, stop, context=False)
    out.write_text(json.dumps(res, indent=1) + "\n")
    log("baseline:", {k: (v["accuracy"], round(v["fkl_own"], 3)) for k, v in res.items()})
    return res


def _load(work: Path, arm: str, seeds=(0, 1)):
    return [json.loads((work / f"{arm}_s{s}" / "result.json").read_text()) for s in seeds
            if (work / f"{arm}_s{s}" / "result.json").exists()]


def _ms(values, fmt="{:.3f}") -> str:
    v = np.asarray(values, float)
    return fmt.format(v.mean()) if len(v) == 1 else f"{fmt.format(v.mean())} ± {fmt.format(v.std())} (n={len(v)})"


def teacher_tokens(work: Path, r: dict) -> int:
    """Teacher forward tokens an arm spent: completion tokens scored in training (metrics.jsonl) plus the
    tokens the teacher generated for the answers the arm read (off-policy arms and SFT)."""
    run = work / f"{r['arm']}_s{r['seed']}"
    scored = 0
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            scored += rec.get("on_policy/tokens", 0) + rec.get("off_policy/tokens", 0)
    spec = ARMS[r["arm"]]
    if spec.get("answers") or spec.get("sft"):
        tok = load_tokenizer(FULL)
        path = work / f"teacher_answers_{'fr' if spec.get('context') else 'plain'}_s{r['seed']}.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        share = 0.5 if spec.get("per_domain") == 2 else 1.0  # GKD reads half as many answer rows a step
        scored += int(share * sum(len(tok(x["answer"])["input_ids"]) + 1 for x in rows))
    return int(scored)


def report(work: Path):
    """The markdown tables of docs/results.md from WORK's result files."""
    base = json.loads((work / "baseline.json").read_text())
    acc = lambda rs, d: _ms([r["accuracy"][d] for r in rs])  # noqa: E731
    print("| arm | capital | sum_digits | mean accuracy | fKL, own samples | fKL, teacher samples | stop rate | "
          "teacher tokens | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, rs in (("24-layer student, start", [base["pruned"]]), ("full model (teacher)", [base["teacher_alone"]])):
        print(f"| {name} | {acc(rs, 'capital')} | {acc(rs, 'sum_digits')} | {acc(rs, 'mean')} | "
              f"{_ms([r['fkl_own'] for r in rs])} | {_ms([r['fkl_teacher_samples'] for r in rs])} | "
              f"{_ms([r['stop_rate'] for r in rs], '{:.2f}')} | | |")
    for arm in ("on_fkl", "on_rkl", "off_kd", "gkd", "sft", "mask_fkl", "sgd_fkl", "eff_fkl"):
        rs = _load(work, arm)
        if rs:
            print(f"| {arm} | {acc(rs, 'capital')} | {acc(rs, 'sum_digits')} | {acc(rs, 'mean')} | "
                  f"{_ms([r['fkl_own'] for r in rs])} | {_ms([r['fkl_teacher_samples'] for r in rs])} | "
                  f"{_ms([r['stop_rate'] for r in rs], '{:.2f}')} | {_ms([teacher_tokens(work, r) for r in rs], '{:.0f}')} | "
                  f"{_ms([r['seconds'] / 60 for r in rs], '{:.1f}')} |")
    print()
    print("| arm | French, greedy | French, sampled | capital | sum_digits | fKL to the prompted teacher, own samples |")
    print("| --- | --- | --- | --- | --- | --- |")
    b = base["full_vs_context_teacher"]
    rows = [("full model, no instruction (start)", [b])] + [(a, _load(work, a)) for a in ("ctx_opd", "ctx_sft")]
    for name, rs in rows:
        if rs:
            print(f"| {name} | {_ms([r['french_greedy'] for r in rs], '{:.2f}')} | "
                  f"{_ms([r['french_sampled'] for r in rs], '{:.2f}')} | {acc(rs, 'capital')} | {acc(rs, 'sum_digits')} | "
                  f"{_ms([r['fkl_own'] for r in rs])} |")


def analysis_rows(work: Path, runs=("on_fkl", "ctx_opd")):
    """One table from `opd-jax analyze` outputs (WORK/analysis_<run>/analysis.json). The random-subspace
    overlap k/n uses this model's input widths (576; 1536 into mlp_down)."""
    reps = {r: json.loads((work / f"analysis_{r}" / "analysis.json").read_text()) for r in runs
            if (work / f"analysis_{r}" / "analysis.json").exists()}
    reps = {r: a for r, a in reps.items() if "sparsity_bfloat16" in a}  # written by the current analyze
    if not reps:
        return
    print("| measure | " + " | ".join(reps) + " |")
    print("| --- |" + " --- |" * len(reps))

    def row(label, fn):
        print(f"| {label} | " + " | ".join(fn(a) for a in reps.values()) + " |")

    mats = lambda a: [m for m in a["matrices"] if "effective_rank" in m and m["module"] not in ("embedding", "norm")]  # noqa: E731
    row("coordinates that did not move, float32", lambda a: f"{100 * a['sparsity']:.3f}%")
    row("coordinates that did not move at bfloat16 resolution", lambda a: f"{100 * a['sparsity_bfloat16']:.1f}%")
    mv = lambda a, ks: " / ".join(f"{a['relative_movement_by_module'][k]:.4f}" for k in ks)  # noqa: E731
    row("relative movement attention q / k / v / o", lambda a: mv(a, ("attn_q", "attn_k", "attn_v", "attn_o")))
    row("relative movement MLP gate / up / down", lambda a: mv(a, ("mlp_gate", "mlp_up", "mlp_down")))
    row("relative movement embeddings / norms", lambda a: mv(a, ("embedding", "norm")))
    row("numerical rank / full rank of dW (block matrices)",
        lambda a: f"{np.mean([m['numerical_rank'] / m['full_rank'] for m in mats(a)]):.3f}")
    row("effective rank / full rank", lambda a: f"{np.mean([m['effective_rank'] / m['full_rank'] for m in mats(a)]):.3f}")
    row(f"energy in the top {next(iter(reps.values()))['k']} singular values",
        lambda a: f"{np.mean([m['energy_top_k'] for m in mats(a)]):.3f}")
    row("overlap of dW's top-k left subspace with W0's (random k/n in brackets)",
        lambda a: f"{np.mean([m['overlap_with_w0'] for m in mats(a)]):.3f} "
                  f"({np.mean([a['k'] / (1536 if m['module'] == 'mlp_down' else 576) for m in mats(a)]):.3f})")
    row("near-zero preference, float32 moves (1 = none)", lambda a: f"{a['near_zero_preference_mean']:.3f}")
    row("near-zero preference, moves at bfloat16 resolution",
        lambda a: f"{a.get('near_zero_preference_bfloat16_mean', float('nan')):.3f}")


def effopd_rows(work: Path, w: int = 5):
    """Steps to 95% of the plain run's divergence reduction (trailing mean of the on-policy divergence
    over w steps), EffOPD against plain, per seed present for both."""
    sys.path.insert(0, str(Path(__file__).parent))
    from common import smooth

    for seed in (0, 1):
        runs = {a: work / f"{a}_s{seed}" / "metrics.jsonl" for a in ("on_fkl", "eff_fkl")}
        if not all(p.exists() for p in runs.values()):
            continue
        curves = {a: smooth([json.loads(x).get("on_policy/divergence", np.nan) for x in p.read_text().splitlines()], w)
                  for a, p in runs.items()}
        plain = curves["on_fkl"]
        target = plain[0] - 0.95 * (plain[0] - plain[-1])
        hit = {a: int(np.argmax(c <= target)) + 1 if (c <= target).any() else None for a, c in curves.items()}
        print(f"seed {seed}: start {plain[0]:.3f}, plain final {plain[-1]:.3f}, EffOPD final {curves['eff_fkl'][-1]:.3f}; "
              f"steps to {target:.3f}: plain {hit['on_fkl']}, EffOPD {hit['eff_fkl']}")
        alphas = [json.loads(x) for x in runs["eff_fkl"].read_text().splitlines()]
        print("  EffOPD records with alpha:", [(r["step"], {k: v for k, v in r.items() if "effopd" in k})
                                              for r in alphas if any("effopd" in k for k in r)])


def prompted_teacher(work: Path) -> dict:
    """The context teacher on its own: greedy accuracy and French rate with the instruction."""
    out = work / "prompted_teacher.json"
    if out.exists():
        return json.loads(out.read_text())
    tok, stop, teacher = full_model()
    ex = PromptSource(DOMAINS).batch(0, EVAL_PER_DOMAIN, stream=1)
    g = sample_rows(teacher, FrenchPrompter(tok), ex, jax.random.key(0), 0.0, stop)
    texts = decode_completions(tok, g[0][:, MAX_PROMPT:], g[2], stop)
    rew = rewards_for(ex, texts, verifiers_for({}, DOMAINS))
    s = sample_rows(teacher, FrenchPrompter(tok), ex, jax.random.key(2), 1.0, stop)
    res = {"accuracy": {d: float(rew[[e.domain == d for e in ex]].mean()) for d in DOMAINS},
           "french_greedy": french_rate(texts),
           "french_sampled": french_rate(decode_completions(tok, s[0][:, MAX_PROMPT:], s[2], stop)),
           "greedy_examples": texts[:3] + texts[EVAL_PER_DOMAIN:EVAL_PER_DOMAIN + 3]}
    out.write_text(json.dumps(res, indent=1) + "\n")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", nargs="+", default=["baseline", "on_fkl", "off_kd"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--work", default="runs/real")
    ap.add_argument("--report", action="store_true", help="print the markdown tables from the results so far")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.report:
        print(json.dumps(prompted_teacher(work)))
        report(work)
        print()
        analysis_rows(work)
        print()
        return effopd_rows(work)
    for arm in a.arms:
        for seed in a.seeds:
            if arm == "baseline":
                baseline(work)
                break
            try:
                run_arm(arm, seed, work)
            except Exception as e:  # one failed arm does not stop the queue; its error is logged
                log(f"{arm} s{seed} FAILED: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
