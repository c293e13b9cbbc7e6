"""Greedy evaluation: exact-match accuracy per domain on a fixed set of prompts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.distributed import to_host
from opd_jax.sampling import generate
from opd_jax.tasks import encode_prompts, reward


def decode_completions(tokenizer, tokens, mask, stop=None) -> list[str]:
    """Text of each completion (tokens [B, N] under mask [B, N]), without its stop token (`stop`: the
    stop ids, default the tokenizer's EOS)."""
    out = []
    stop = {tokenizer.eos_token_id} if stop is None else set(stop)
    for row, m in zip(np.asarray(tokens), np.asarray(mask)):
        ids = [int(t) for t, keep in zip(row, m) if keep and t not in stop]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def rewards_for(examples, texts) -> np.ndarray:
    return np.array([reward(t, ex.answer) for ex, t in zip(examples, texts)], np.float32)


def greedy_accuracy(model, tokenizer, examples, *, max_prompt_len: int, max_new_tokens: int, batch: int = 256,
                    mesh=None, stop=None) -> dict[str, float]:
    """{domain: accuracy} of greedy completions (exact match), plus "mean" over domains. stop: the
    stop ids (default the tokenizer's EOS)."""
    stop = (tokenizer.eos_token_id,) if stop is None else tuple(stop)
    hits: dict[str, list[float]] = {}
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        ids, pmask = encode_prompts(tokenizer, [e.prompt for e in chunk], max_prompt_len)
        n = len(chunk)
        if n < batch and len(examples) > batch:  # keep one compiled shape
            ids = np.concatenate([ids, np.repeat(ids[-1:], batch - n, 0)])
            pmask = np.concatenate([pmask, np.repeat(pmask[-1:], batch - n, 0)])
        roll = generate(model, jnp.asarray(ids), jnp.asarray(pmask), key=jax.random.key(0),
                        max_new_tokens=max_new_tokens, temperature=0.0, eos_id=list(stop),
                        pad_id=tokenizer.pad_token_id or 0, mesh=mesh)
        texts = decode_completions(tokenizer, to_host(roll.tokens)[:n, ids.shape[1]:], to_host(roll.mask)[:n], stop)
        for ex, r in zip(chunk, rewards_for(chunk, texts)):
            hits.setdefault(ex.domain, []).append(float(r))
    acc = {d: float(np.mean(v)) for d, v in sorted(hits.items())}
    acc["mean"] = float(np.mean(list(acc.values()))) if acc else 0.0
    return acc
