"""Sampled-token OPD: only log pi(y) and log q(y) of the tokens the student sampled are needed.

With r_t = q(y_t | c_t) / pi(y_t | c_t) at each generated token, the surrogate is

    L = mean_t  sg(w_t) * log pi_theta(y_t | c_t)        (masked mean, see `masking`)

whose gradient is the estimator. The weight w_t:

* token level ("discount 0", the usual OPD), target grad of sum_t D_f(q(.|c_t) || pi(.|c_t)) with
  the contexts c_t held fixed:
    estimator="stop_grad": w_t = f(r_t)           (-f(r) treated as a fixed reward; biased unless
                                                   f(r) - (f(r) - r f'(r)) has zero mean, which
                                                   holds for reverse KL only)
    estimator="opd_plus" : w_t = g(r_t) = f(r_t) - r_t f'(r_t)   (unbiased for every f)
* sequence level, target grad of E_y[ sum_t f(r_t) ] including how theta moves the contexts
  (for reverse KL this is exactly KL(pi(y) || q(y)) over whole sequences):
    stop_grad: w_t = sum_{s>=t} f(r_s)            opd_plus: w_t = g(r_t) + sum_{s>t} f(r_s)

Stale rollouts: with `sampler_logprobs` (log-probs of the policy that sampled y), the term becomes
the PPO-clipped  max(w_t rho_t, w_t clip(rho_t, 1-eps, 1+eps)),  rho_t = pi_theta(y_t)/pi_old(y_t),
whose gradient at rho = 1 equals the plain surrogate's.

Asynchronous training (`is_cap` > 0, train.max_staleness >= 1): y was drawn by an older policy
mu (the sampler's log-probs) and rho = pi_theta / mu is an importance weight. The PPO-clipped term
above is kept with rho truncated at is_cap (`truncated_ratio`: value min(rho, is_cap), gradient
min(rho, is_cap) grad log pi). Where the clip is inactive the gradient is min(rho, C) w grad log pi;
untruncated, E_mu[rho w grad log pi] = E_pi[w grad log pi], the synchronous estimator's expectation
(per token, contexts fixed). The cap bounds the variance (tokens over it: is_clip_fraction) and the
clip keeps one update within the trust region, each at the cost of a bias on the tokens it touches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd_jax.errors import OpdError
from opd_jax.losses.fdiv import get_fdiv
from opd_jax.losses.masking import clean, masked_mean

ESTIMATORS = ("stop_grad", "opd_plus")
LEVELS = ("token", "sequence")


def segment_sums(x, seqs):
    """Per-sequence sums of a packed part's per-target x [R, T]: seqs = (seq_index [R, T], n) -> [n]
    (`opd_jax.packing`: seq_index names each target's sequence, n on non-targets)."""
    seq_index, n = seqs
    return jax.ops.segment_sum(jnp.ravel(x), jnp.ravel(seq_index), n + 1)[:n]


def per_target(v, seqs):
    """A per-sequence value v [n] at each target of its sequence [R, T] (0 on non-targets)."""
    return jnp.append(v, jnp.zeros((1,), v.dtype))[seqs[0]]


def reward_to_go(x, mask, *, include_current=True, seqs=None):
    """sum_{s >= t} m_s x_s (or s > t) along the last axis; [B, T] -> [B, T]. seqs (packed rows,
    `segment_sums`): the sum stops at the end of t's sequence: the row's suffix sum less what follows
    the sequence's last target."""
    x = clean(x, mask)
    suffix = jnp.flip(jnp.cumsum(jnp.flip(x, -1), -1), -1)
    if seqs is not None:
        idx = seqs[0]
        last = (idx != jnp.pad(idx[:, 1:], ((0, 0), (0, 1)), constant_values=-1)) & (idx < seqs[1])
        suffix = suffix - per_target(segment_sums((suffix - x) * last, seqs), seqs)
    return suffix if include_current else suffix - x


def loo_baseline(w, mask):
    """Leave-one-sequence-out baseline: for row i, the mean weight over the real tokens of all other rows.

    Rows are independent samples, so row i's baseline does not depend on row i's tokens and
    E[(w_t - b_i) grad log pi_t] = E[w_t grad log pi_t]: the estimator stays unbiased (tested), while a
    constant offset in w, like reverse KL's "+1", is removed. (A baseline from other tokens of the
    *same* row would not be unbiased: later tokens depend on earlier ones.) [B, T] -> [B, 1].
    """
    m = mask.astype(jnp.float32)
    wm = clean(w, mask) * m
    row_sum, row_n = jnp.sum(wm, -1, keepdims=True), jnp.sum(m, -1, keepdims=True)
    others = jnp.sum(m) - row_n
    return jnp.where(others > 0, (jnp.sum(wm) - row_sum) / jnp.maximum(others, 1.0), 0.0)


def segment_loo_baseline(w, mask, seqs):
    """`loo_baseline` of packed rows: for each target, the mean weight over the real tokens of every other
    sequence in the part (mask may hold weights: a token counts where it is > 0). [R, T] -> [R, T]."""
    m = (mask > 0).astype(jnp.float32)
    wm = clean(w, mask) * m
    seq_sum, seq_n = per_target(segment_sums(wm, seqs), seqs), per_target(segment_sums(m, seqs), seqs)
    others = jnp.sum(m) - seq_n
    return jnp.where(others > 0, (jnp.sum(wm) - seq_sum) / jnp.maximum(others, 1.0), 0.0)


def importance_weights(student_logprobs, sampler_logprobs, mask, cap: float):
    """Truncated importance weights iw_t = min(exp(log pi_theta - log mu), cap) [B, T] (no gradient) and
    their metrics: is_weight (mean iw), is_clip_fraction (share of tokens with ratio > cap),
    logprob_mismatch (mean |log pi_theta - log mu|), sampler_kl (mean log mu - log pi_theta)."""
    diff = jax.lax.stop_gradient(clean(student_logprobs, mask) - clean(sampler_logprobs, mask))
    ratio = jnp.exp(diff)
    iw = clean(jnp.minimum(ratio, cap), mask)
    return iw, {"is_weight": masked_mean(iw, mask),
                "is_clip_fraction": masked_mean((ratio > cap).astype(jnp.float32), mask),
                "logprob_mismatch": masked_mean(jnp.abs(diff), mask), "sampler_kl": masked_mean(-diff, mask)}


def truncated_ratio(student_logprobs, sampler_logprobs, cap: float):
    """rho = pi_theta / mu truncated at `cap`: value min(rho, cap), gradient min(rho, cap) grad log pi
    (the ratio's own gradient rescaled by sg(min(rho, cap) / rho)). [B, T] -> [B, T]."""
    rho = jnp.exp(student_logprobs - jax.lax.stop_gradient(sampler_logprobs))
    return rho * jax.lax.stop_gradient(jnp.minimum(rho, cap) / rho)


def opd_weights(student_logprobs, teacher_logprobs, mask, kind, *, estimator="opd_plus", level="token",
                beta=0.5, alpha=0.5, baseline="none", seqs=None):
    """Per-token weights w_t [B, T] (no gradient) and the per-token divergence samples f(r_t).

    baseline="loo" subtracts the leave-one-sequence-out mean of w (`loo_baseline`) for lower variance.
    seqs: packed rows (`segment_sums`): the sums that run along a sequence stop at its end.
    """
    if estimator not in ESTIMATORS:
        raise OpdError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if level not in LEVELS:
        raise OpdError(f"level must be one of {LEVELS}, got {level!r}")
    fd = get_fdiv(kind, beta=beta, alpha=alpha)
    lr = jax.lax.stop_gradient(clean(teacher_logprobs, mask) - clean(student_logprobs, mask))
    f_r = clean(fd.f(lr), mask)
    own = f_r if estimator == "stop_grad" else clean(fd.g(lr), mask)
    if level == "sequence":
        own = own + reward_to_go(f_r, mask, include_current=False, seqs=seqs)
    if baseline == "loo":
        own = clean(own - (loo_baseline(own, mask) if seqs is None else segment_loo_baseline(own, mask, seqs)), mask)
    elif baseline != "none":
        raise OpdError(f"baseline must be 'none' or 'loo', got {baseline!r}")
    return jax.lax.stop_gradient(own), f_r


def sampled_surrogate(student_logprobs, teacher_logprobs, mask, kind="reverse_kl", *, estimator="opd_plus",
                      level="token", beta=0.5, alpha=0.5, sampler_logprobs=None, clip_eps=0.2,
                      normalize="token", baseline="none", is_cap=0.0, seqs=None):
    """The sampled-token OPD surrogate -> (loss, metrics).

    student_logprobs [B, T]: log pi_theta(y_t | c_t) of the sampled tokens, differentiable (the
    trainer recomputes them). teacher_logprobs [B, T]: log q(y_t | c_t) (no gradient).
    mask [B, T]: 1 on generated tokens incl. EOS. sampler_logprobs [B, T] (optional): the sampler's
    log-probs, for the PPO-clipped ratio and the sampler/trainer mismatch metric. baseline: "none" or
    "loo" (leave-one-sequence-out mean subtracted from the weights; still unbiased, lower variance).
    Metrics: divergence (mean f(r), a sample estimate of D_f per token), mean_weight, tokens, and
    with sampler log-probs: logprob_mismatch (mean |log pi_theta - log pi_sampler|),
    sampler_kl (mean of log pi_sampler - log pi_theta, an estimate of KL(sampler || trainer)),
    clip_fraction. seqs: a packed part's (seq_index, n) (`segment_sums`).
    """
    w, f_r = opd_weights(student_logprobs, teacher_logprobs, mask, kind, estimator=estimator, level=level,
                         beta=beta, alpha=alpha, baseline=baseline, seqs=seqs)
    slp = clean(student_logprobs, mask)
    metrics = {"divergence": masked_mean(f_r, mask), "per_token_divergence": f_r, "mean_weight": masked_mean(w, mask),
               "tokens": jnp.sum(mask.astype(jnp.float32))}
    if sampler_logprobs is None:
        per_token = w * slp
    elif is_cap > 0:  # PPO-clipped against the sampler, with the ratio truncated at is_cap
        old = jax.lax.stop_gradient(clean(sampler_logprobs, mask))
        rho = truncated_ratio(slp, old, is_cap)
        per_token = jnp.maximum(w * rho, w * jnp.clip(rho, 1.0 - clip_eps, 1.0 + clip_eps))
        _, m = importance_weights(slp, old, mask, is_cap)
        metrics.update(m, clip_fraction=masked_mean((jnp.abs(rho - 1.0) > clip_eps).astype(jnp.float32), mask))
    else:
        old = jax.lax.stop_gradient(clean(sampler_logprobs, mask))
        rho = jnp.exp(slp - old)
        clipped = jnp.clip(rho, 1.0 - clip_eps, 1.0 + clip_eps)
        per_token = jnp.maximum(w * rho, w * clipped)
        diff = jax.lax.stop_gradient(slp - old)
        metrics.update(logprob_mismatch=masked_mean(jnp.abs(diff), mask),
                       sampler_kl=masked_mean(-diff, mask),
                       clip_fraction=masked_mean((jnp.abs(rho - 1.0) > clip_eps).astype(jnp.float32), mask))
    return masked_mean(per_token, mask, normalize), metrics
