"""Sampling from a `Transformer`: one jitted prefill plus a `lax.while_loop` decode over a KV cache.

Layout: the prompt occupies cache slots [0, P) (left-padded, so every row's last prompt token is
at slot P-1) and new token i goes to slot P+i for every row. RoPE positions come from the mask, so
padding never shifts a row's positions. The loop stops as soon as every row has emitted EOS.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.errors import OpdError
from opd_jax.models.transformer import CACHE_AXES, init_cache, positions_from_mask
from opd_jax import sharding as shd

_TRACES = {"generate": 0}


def trace_count() -> int:
    """How many times the generate program has been traced (= compiled) in this process."""
    return _TRACES["generate"]


class Rollout(NamedTuple):
    """tokens [B, P+N] (prompt then completion, `pad_id` after a row's EOS);
    logprobs [B, N] float32, log-probability of each sampled token under the sampling distribution
    (after temperature / top-k / top-p; for greedy decoding, under the temperature-1 model), 0 where
    masked; mask [B, N] int32, 1 up to and including the first EOS; steps: decode steps run
    (< N when every row finished early)."""

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    steps: jax.Array


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
    """Logits of the sampling distribution: divide by temperature, keep the top-k, then the smallest
    set of tokens whose probability reaches top_p (nucleus); others become -inf. [B, V] -> [B, V]."""
    x = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(x, top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p < 1.0:
        srt = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the first
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, -jnp.inf, x)
    return x


def sample_token(logits, key, temperature: float, top_k: int, top_p: float):
    """Draw one token per row. logits [B, V] -> (tokens [B] int32, logprobs [B] float32)."""
    if temperature == 0.0:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    else:
        x = filter_logits(logits, temperature, top_k, top_p)
        tok = jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(x, axis=-1)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def generate(model, prompt_ids, prompt_mask, *, key, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | list[int] | None = None, pad_id: int = 0,
             mesh=None, rules=None) -> Rollout:
    """Sample `max_new_tokens` tokens after left-padded prompts.

    eos_id: the stop ids, one int or several (for example the tokenizer's EOS and every id in
    generation_config.json's eos_token_id); a row ends after the first of them, which counts in its
    mask. Finished rows are filled with pad_id, which may itself be a stop id (Qwen's
    <|endoftext|>): padding never ends a live row early or counts in the mask.

    prompt_ids, prompt_mask: [B, P] (mask 1 on real tokens, left padding 0). `temperature=0` is
    greedy. With `mesh`, the batch and KV cache are constrained to the rules' shardings
    (parameters keep whatever sharding they already have). Deterministic for a given key; compiled
    once per (shapes, settings).
    """
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise OpdError(f"prompt_ids and prompt_mask must both be [B, P]; got {prompt_ids.shape} and "
                       f"{prompt_mask.shape}")
    if max_new_tokens < 1:
        raise OpdError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise OpdError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    cfg = model.cfg
    total = prompt_ids.shape[1] + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise OpdError(f"prompt length {prompt_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
                       f"exceeds the model context {cfg.max_position_embeddings}")
    graphdef, state = nnx.split(model)
    ids, pmask = prompt_ids, prompt_mask
    if mesh is None:
        ids, pmask = jnp.asarray(ids, jnp.int32), jnp.asarray(pmask, jnp.int32)
    else:  # host prompts: each process places only its own rows (multi-host safe)
        from opd_jax.distributed import to_global
        sh = shd.rows_sharding(ids.shape[0], 2, mesh, rules)
        ids, pmask = (x if isinstance(x, jax.Array) and x.sharding == sh else to_global(np.asarray(x, np.int32), sh)
                      for x in (ids, pmask))
        key = to_global(np.asarray(jax.random.key_data(key)), shd.replicated(mesh))
        key = jax.random.wrap_key_data(key)
    stop = tuple(sorted({int(eos_id)} if isinstance(eos_id, (int, np.integer)) else {int(i) for i in eos_id or ()}))
    return _generate(graphdef, state, ids, pmask, key, max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                     top_p=float(top_p), eos_id=stop, pad_id=pad_id, mesh=mesh,
                     rules=None if rules is None else tuple(sorted(rules.items())))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "eos_id", "pad_id", "mesh", "rules"))
def _generate(graphdef, state, prompt_ids, prompt_mask, key, *, max_new_tokens, temperature, top_k, top_p,
              eos_id, pad_id, mesh, rules):
    _TRACES["generate"] += 1
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    b, p = prompt_ids.shape
    n = max_new_tokens
    rules = dict(rules) if rules is not None else None

    def constrain(x, axes):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, shd.named_sharding(axes, x.shape, mesh, rules))

    cache = tuple(constrain(c, CACHE_AXES) for c in init_cache(cfg, b, p + n))
    key_valid = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((b, n), bool)], axis=1)
    h, cache = model.run(prompt_ids, positions_from_mask(prompt_mask), jnp.arange(p), key_valid, cache, 0)
    logits = model.logits(h[:, -1:])[:, 0]
    lengths = prompt_mask.sum(axis=1).astype(jnp.int32)
    tokens = jnp.concatenate([prompt_ids, jnp.full((b, n), pad_id, jnp.int32)], axis=1)
    carry = dict(i=jnp.int32(0), tokens=tokens, logprobs=jnp.zeros((b, n), jnp.float32),
                 mask=jnp.zeros((b, n), jnp.int32), done=jnp.zeros((b,), bool), cache=cache,
                 logits=logits, key=key)

    def cond(c):
        return (c["i"] < n) & ~jnp.all(c["done"])

    def body(c):
        i = c["i"]
        key, sub = jax.random.split(c["key"])
        tok, lp = sample_token(c["logits"], sub, temperature, top_k, top_p)
        live = ~c["done"]
        tok = jnp.where(live, tok, pad_id)
        done = c["done"] | (live & jnp.isin(tok, jnp.asarray(eos_id, jnp.int32))) if eos_id else c["done"]
        col = lambda buf, v, at: jax.lax.dynamic_update_slice(buf, v[:, None].astype(buf.dtype), (0, at))
        h, cache = model.run(tok[:, None], (lengths + i)[:, None], (p + i)[None], key_valid, c["cache"], p + i)
        return dict(i=i + 1, tokens=col(c["tokens"], tok, p + i), logprobs=col(c["logprobs"], jnp.where(live, lp, 0.0), i),
                    mask=col(c["mask"], live, i), done=done, cache=cache,
                    logits=model.logits(h)[:, 0], key=key)

    out = jax.lax.while_loop(cond, body, carry)
    return Rollout(out["tokens"], out["logprobs"], out["mask"], out["i"])
