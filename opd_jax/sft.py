"""Supervised fine-tuning on (prompt, completion) pairs: how the demo trains its teachers and weak student,
and the SFT baseline of the experiments.

    L = - mean over completion tokens of log pi(y_t | prompt, y_<t)     (teacher forcing, EOS included)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from opd_jax import losses as L
from opd_jax.tasks import encode_pairs


def sft_loss(model, tokens, prompt_mask, mask):
    """Mean negative log-likelihood of the completion tokens. tokens [B, P+N], masks [B, P], [B, N]."""
    p = prompt_mask.shape[1]
    h = model.completion_hidden(tokens, jnp.concatenate([prompt_mask, mask], 1), p)
    lp = L.chunked_token_logprobs(h, model.output_matrix(), tokens[:, p:])
    return -L.masked_mean(lp, mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer"), donate_argnums=(1, 2))
def _sft_step(graphdef, params, opt_state, tokens, prompt_mask, mask, *, optimizer):
    loss, grads = jax.value_and_grad(lambda p: sft_loss(nnx.merge(graphdef, p), tokens, prompt_mask, mask))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def sft_train(model, tokenizer, batches, *, steps: int, lr: float = 3e-3, max_prompt_len: int = 16,
              max_new_tokens: int = 8, progress: str | None = None, warmup: int = 20):
    """Train `model` in place on `batches(step) -> list[(prompt, completion)]` for `steps` steps with
    AdamW (warm-up then cosine decay) and global-norm clipping at 1. Returns the per-step losses."""
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(steps - 1, 1)), max(steps, 2))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.99, weight_decay=0.0))
    opt_state = optimizer.init(params)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=progress, dynamic_ncols=True, leave=False)
    losses = []
    for step in it:
        pairs = batches(step)
        tokens, pmask, amask = encode_pairs(tokenizer, [p for p, _ in pairs], [c for _, c in pairs], max_prompt_len,
                                            max_new_tokens)
        params, opt_state, loss = _sft_step(graphdef, params, opt_state, tokens, pmask, amask, optimizer=optimizer)
        losses.append(float(loss))
        if progress and step % 20 == 0:
            it.set_postfix(loss=f"{losses[-1]:.3f}")
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return losses
