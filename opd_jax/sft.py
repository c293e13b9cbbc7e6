"""Supervised fine-tuning on (prompt, completion) pairs: how the demo trains its teachers and weak student,
and the SFT baseline of the experiments. Optionally with injected mistakes (`inject_mistakes`), so a
teacher's next-token targets stay useful on prefixes that went wrong.

    L = - mean over completion tokens of log pi(y_t | prompt, y_<t)     (teacher forcing, EOS included)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
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


def inject_mistakes(tokens, mask, prompt_len: int, rate: float, rng: np.random.RandomState, choices):
    """Rows with one wrong token followed by the correct continuation, so a teacher learns what to
    write after a mistake (the student's wrong prefixes are where on-policy targets matter).

    Each row with at least two completion tokens is picked with probability `rate`; one of its
    completion tokens before the last is replaced by a different token drawn from `choices` (token
    ids), and its loss is masked (the model never learns to write the mistake); every later token is
    the row's original continuation. tokens [B, P+N], mask [B, N] (host arrays) -> new (tokens, mask)."""
    tokens, mask = np.array(tokens, copy=True), np.array(mask, copy=True)
    choices = np.asarray(choices)
    for r in range(tokens.shape[0]):
        n = int(mask[r].sum())
        if n < 2 or rng.rand() >= rate:
            continue
        j = int(rng.randint(0, n - 1))
        original = tokens[r, prompt_len + j]
        others = choices[choices != original]
        tokens[r, prompt_len + j] = others[rng.randint(len(others))]
        mask[r, j] = 0
    return tokens, mask


def sft_train(model, tokenizer, batches, *, steps: int, lr: float = 3e-3, max_prompt_len: int = 16,
              max_new_tokens: int = 8, progress: str | None = None, warmup: int = 20, mistake_rate: float = 0.0,
              mistake_tokens=None, seed: int = 0):
    """Train `model` in place on `batches(step) -> list[(prompt, completion)]` for `steps` steps with
    AdamW (warm-up then cosine decay) and global-norm clipping at 1. mistake_rate > 0: that fraction
    of rows carries one injected wrong token (`inject_mistakes`, drawn from `mistake_tokens`, default
    the whole vocabulary but the special tokens). Returns the per-step losses."""
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
    rng = np.random.RandomState(seed)
    if mistake_rate > 0 and mistake_tokens is None:
        mistake_tokens = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
    for step in it:
        pairs = batches(step)
        tokens, pmask, amask = encode_pairs(tokenizer, [p for p, _ in pairs], [c for _, c in pairs], max_prompt_len,
                                            max_new_tokens)
        if mistake_rate > 0:
            tokens, amask = (jnp.asarray(x) for x in inject_mistakes(tokens, amask, max_prompt_len, mistake_rate, rng,
                                                                     mistake_tokens))
        params, opt_state, loss = _sft_step(graphdef, params, opt_state, tokens, pmask, amask, optimizer=optimizer)
        losses.append(float(loss))
        if progress and step % 20 == 0:
            it.set_postfix(loss=f"{losses[-1]:.3f}")
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return losses
