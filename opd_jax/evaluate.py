"""Evaluation: greedy accuracy per domain and pass@k, scored by each domain's verifier."""

from __future__ import annotations

import jax
import numpy as np

from opd_jax.distributed import to_host
from opd_jax.engine import generate
from opd_jax.tasks import Prompter
from opd_jax.tasks.verifiers import exact


def decode_completions(tokenizer, tokens, mask, stop=None) -> list[str]:
    """Text of each completion (tokens [B, N] under mask [B, N]), without its stop token (`stop`: the
    stop ids, default the tokenizer's EOS)."""
    out = []
    stop = {tokenizer.eos_token_id} if stop is None else set(stop)
    for row, m in zip(np.asarray(tokens), np.asarray(mask)):
        ids = [int(t) for t, keep in zip(row, m) if keep and t not in stop]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def rewards_for(examples, texts, verifiers: dict | None = None) -> np.ndarray:
    """[B] float32 rewards: each completion scored by its domain's verifier (default exact match)."""
    verifiers = verifiers or {}
    return np.array([verifiers.get(ex.domain, exact)(t, ex.answer) for ex, t in zip(examples, texts)], np.float32)


def sample_completions(model, prompter, examples, *, max_prompt_len: int, max_new_tokens: int, batch: int = 256,
                       mesh=None, stop=None, temperature: float = 0.0, key=None, rules=None, group: int = 1,
                       slots: int | None = None) -> list[str]:
    """`group` completions per example (greedy at temperature 0), through the rollout engine in chunks of
    `batch` prompts (a short last chunk is padded so one compiled shape serves all); sample g of
    example j is text j * group + g. slots: the engine's decode slots (default one per row)."""
    tok = prompter.tokenizer
    stop = (tok.eos_token_id,) if stop is None else tuple(stop)
    key = jax.random.key(0) if key is None else key
    texts = []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        ids, pmask = prompter.encode(chunk, max_prompt_len)
        n = len(chunk)
        if n < batch and len(examples) > batch:  # keep one compiled shape
            ids = np.concatenate([ids, np.repeat(ids[-1:], batch - n, 0)])
            pmask = np.concatenate([pmask, np.repeat(pmask[-1:], batch - n, 0)])
        rows = ids.shape[0] * group
        roll = generate(model, ids, pmask, key=jax.random.fold_in(key, i), max_new_tokens=max_new_tokens,
                        temperature=temperature, eos_id=list(stop), pad_id=tok.pad_token_id or 0, mesh=mesh,
                        rules=rules, group=group, slots=min(slots or rows, rows))
        keep = n * group
        texts += decode_completions(tok, to_host(roll.tokens)[:keep, ids.shape[1]:], to_host(roll.mask)[:keep], stop)
    return texts


def per_domain(examples, scores) -> dict[str, float]:
    """{domain: mean score}, plus "mean" over domains."""
    hits: dict[str, list[float]] = {}
    for ex, r in zip(examples, scores):
        hits.setdefault(ex.domain, []).append(float(r))
    out = {d: float(np.mean(v)) for d, v in sorted(hits.items())}
    out["mean"] = float(np.mean(list(out.values()))) if out else 0.0
    return out


def greedy_accuracy(model, tokenizer, examples, *, max_prompt_len: int, max_new_tokens: int, batch: int = 256,
                    mesh=None, stop=None, prompter=None, verifiers=None, return_texts: bool = False):
    """{domain: accuracy} of greedy completions scored by `verifiers` ({domain: fn}, default exact
    match), plus "mean" over domains. stop: the stop ids (default the tokenizer's EOS); prompter: how
    prompts are rendered (default raw strings). With return_texts: (accuracy, texts, rewards)."""
    prompter = prompter or Prompter(tokenizer)
    texts = sample_completions(model, prompter, examples, max_prompt_len=max_prompt_len,
                               max_new_tokens=max_new_tokens, batch=batch, mesh=mesh, stop=stop)
    rewards = rewards_for(examples, texts, verifiers)
    acc = per_domain(examples, rewards)
    return (acc, texts, rewards) if return_texts else acc


def pass_at_k(model, prompter, examples, k: int, *, temperature: float, max_prompt_len: int, max_new_tokens: int,
              batch: int = 256, mesh=None, stop=None, verifiers=None, seed: int = 0) -> dict[str, float]:
    """{domain: pass@k}: the fraction of prompts with at least one of k sampled completions that its
    verifier scores > 0 (reward 1 counts as solved; partial rewards count when positive)."""
    rep = [ex for ex in examples for _ in range(k)]
    texts = sample_completions(model, prompter, examples, max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
                               batch=max(1, batch // k), mesh=mesh, stop=stop, temperature=temperature,
                               key=jax.random.key(seed), group=k)
    solved = rewards_for(rep, texts, verifiers).reshape(len(examples), k).max(1) > 0
    return per_domain(examples, solved)
