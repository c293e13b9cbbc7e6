"""Sampling maths (temperature / top-k / top-p filtering, drawing a token per row) and `generate`,
the simple public call on top of the rollout engine (`opd_jax.engine`).

The engine's cache layout: a prompt occupies slots [0, P) (left-padded, so its last token is at slot
P-1) and new token i goes to slot P+i. RoPE positions come from the mask, so padding never shifts a
row's positions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.errors import OpdError
from opd_jax import sharding as shd

def trace_count() -> int:
    """How many times the engine's decoding programs (the slot loop's decode, the whole-rollout program)
    have been traced (= compiled) in this process."""
    from opd_jax.engine import TRACES
    return TRACES["decode"] + TRACES["whole"]


class Rollout(NamedTuple):
    """tokens [B, P+N] (prompt then completion, `pad_id` after a row's EOS);
    logprobs [B, N] float32, log-probability of each sampled token under the sampling distribution
    (after temperature / top-k / top-p; for greedy decoding, under the temperature-1 model), 0 where
    masked; mask [B, N] int32, 1 up to and including the first EOS; steps: decode steps the engine
    ran (each over all its slots: at most N with one slot per row, more when slots refill)."""

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


def sample_rows(logits, keys, temperature: float, top_k: int, top_p: float):
    """One token per row, row b drawn with its own key keys[b] (the engine's per-sequence keys).
    logits [B, V], keys [B] -> (tokens [B] int32, logprobs [B] float32), as `sample_token`."""
    if temperature == 0.0:
        return sample_token(logits, None, 0.0, 0, 1.0)
    x = filter_logits(logits, temperature, top_k, top_p)
    tok = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x).astype(jnp.int32)
    return tok, jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tok[:, None], axis=-1)[:, 0]


def generate(model, prompt_ids, prompt_mask, *, key, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | list[int] | None = None, pad_id: int = 0,
             mesh=None, rules=None, slots: int | None = None, group: int = 1, steps_per_call: int = 8) -> Rollout:
    """Sample up to `max_new_tokens` tokens after left-padded prompts, through the rollout engine
    (`opd_jax.engine`; this is its simple call).

    eos_id: the stop ids, one int or several (for example the tokenizer's EOS and every id in
    generation_config.json's eos_token_id); a row ends after the first of them, which counts in its
    mask. Finished rows are filled with pad_id, which may itself be a stop id (Qwen's
    <|endoftext|>): padding never ends a live row early or counts in the mask.

    prompt_ids, prompt_mask: [B, P] (mask 1 on real tokens, left padding 0). `temperature=0` is
    greedy. group: samples per prompt (rows = B * group, sample g of prompt j at row j * group + g;
    the prompt is prefilled once). slots: decode slots (default every row). Row q draws token i with
    fold_in(fold_in(key, q), i): the result does not depend on `slots`. With `mesh`, the weights are
    placed in the rollout layout (`rules`, default `sharding.ROLLOUT_RULES`) and the slots over the
    batch axes. Compiled once per (shapes, settings).
    """
    from opd_jax.engine import Engine, EngineSpec

    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise OpdError(f"prompt_ids and prompt_mask must both be [B, P]; got {prompt_ids.shape} and "
                       f"{prompt_mask.shape}")
    stop = tuple(sorted({int(eos_id)} if isinstance(eos_id, (int, np.integer)) else {int(i) for i in eos_id or ()}))
    graphdef, state = nnx.split(model)
    spec = EngineSpec(prompt_len=prompt_ids.shape[1], max_new_tokens=max_new_tokens,
                      slots=slots or prompt_ids.shape[0] * group, temperature=float(temperature), top_k=int(top_k),
                      top_p=float(top_p), stop=stop, pad_id=int(pad_id), steps_per_call=steps_per_call)
    rules = shd.ROLLOUT_RULES if rules is None and mesh is not None else rules
    engine = Engine(graphdef, model.cfg, spec, mesh, rules)
    return engine.run(nnx.to_pure_dict(state), prompt_ids, prompt_mask, key, group=group)[0]
