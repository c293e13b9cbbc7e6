"""Mixtures: GKD's on/off-policy lambda, and RL on a verifiable reward combined with OPD.

GKD:     L = (1 - lambda) * L_data + lambda * L_on_policy
         (L_data: the divergence on dataset / teacher completions, L_on_policy: on the student's own
         samples; both are (loss, metrics) pairs from this package, masked the same way.)

RL+OPD:  per-token advantage  A_t = (1 - alpha) * A_grpo(x) + alpha * (-w_t)      mode="mix"
                              A_t = -w_t                                           mode="replace"
         where A_grpo is the group-relative advantage of the sequence's reward (GRPO) and w_t the
         OPD weight of `sampled.opd_weights` (so -w_t plays the role of a per-token reward), and
         L = masked mean of  -min(A_t rho_t, A_t clip(rho_t, 1-eps, 1+eps)),
         rho_t = pi_theta(y_t) / pi_old(y_t)  (rho = exp(logp - sg(logp)) when no sampler log-probs).
         Asynchronous training (is_cap > 0): rho, against the sampler mu, is truncated at is_cap
         (`sampled.truncated_ratio`: value and gradient weight min(rho, is_cap)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd_jax.errors import OpdError
from opd_jax.losses.masking import clean, masked_mean
from opd_jax.losses.sampled import importance_weights, opd_weights, per_target, truncated_ratio


def gkd_loss(on_policy, off_policy, lam: float):
    """(1 - lam) * off_policy + lam * on_policy for two (loss, metrics) pairs -> (loss, metrics).

    lam = 1 is pure on-policy distillation, lam = 0 supervised KD on dataset completions.
    """
    if not 0.0 <= lam <= 1.0:
        raise OpdError(f"GKD lambda must be in [0, 1], got {lam}")
    (lon, mon), (loff, moff) = on_policy, off_policy
    metrics = {**{f"on_policy/{k}": v for k, v in mon.items()}, **{f"off_policy/{k}": v for k, v in moff.items()}}
    return lam * lon + (1.0 - lam) * loff, metrics


def group_advantages(rewards, group_size: int, *, scale: bool = True, eps: float = 1e-6):
    """GRPO advantages: (r - mean of its group) / (std of its group + eps) when `scale`.

    rewards [B] with B = n_groups * group_size, rows of one prompt contiguous. -> [B] float32.
    A group whose rewards are all equal gets advantage 0.
    """
    r = rewards.astype(jnp.float32)
    if r.shape[0] % group_size:
        raise OpdError(f"batch of {r.shape[0]} rewards is not a multiple of group size {group_size}")
    g = r.reshape(-1, group_size)
    adv = g - g.mean(axis=1, keepdims=True)
    if scale:
        adv = adv / (g.std(axis=1, keepdims=True) + eps)
    return adv.reshape(-1)


def rl_opd_surrogate(student_logprobs, teacher_logprobs, rewards, mask, *, group_size: int, alpha: float = 0.5,
                     mode: str = "mix", kind: str = "reverse_kl", estimator: str = "opd_plus", beta=0.5,
                     div_alpha=0.5, sampler_logprobs=None, clip_eps: float = 0.2, normalize: str = "token",
                     is_cap: float = 0.0, seqs=None):
    """Policy gradient on a verifiable reward plus (or replaced by) the OPD term -> (loss, metrics).

    student_logprobs, teacher_logprobs, mask [B, T]; rewards [B]. alpha is the weight of the OPD
    term in mode "mix" (alpha = 0: pure GRPO, alpha = 1: pure OPD in PPO form); mode "replace" uses
    the OPD advantage alone (the MOPD form). kind/estimator/beta/div_alpha choose the divergence.
    Metrics: reward, divergence, advantage, clip_fraction, and logprob_mismatch with sampler log-probs.
    seqs: a packed part's (seq_index, n) (`sampled.segment_sums`); rewards are then per sequence [n].
    """
    if mode not in ("mix", "replace"):
        raise OpdError(f"mode must be 'mix' or 'replace', got {mode!r}")
    if teacher_logprobs is None:
        if mode == "replace" or alpha:
            raise OpdError("teacher_logprobs are needed unless mode='mix' with alpha=0")
        w = f_r = jnp.zeros_like(student_logprobs, dtype=jnp.float32)
    else:
        w, f_r = opd_weights(student_logprobs, teacher_logprobs, mask, kind, estimator=estimator, beta=beta,
                             alpha=div_alpha, seqs=seqs)
    a_opd = -w
    if mode == "replace":
        adv = a_opd
    else:
        a_rl = group_advantages(rewards, group_size)
        a_rl = a_rl[:, None] if seqs is None else per_target(a_rl, seqs)
        adv = (1.0 - alpha) * a_rl + alpha * a_opd
    adv = jax.lax.stop_gradient(adv)
    slp = clean(student_logprobs, mask)
    stale = is_cap > 0 and sampler_logprobs is not None
    old = jax.lax.stop_gradient(slp if sampler_logprobs is None else clean(sampler_logprobs, mask))
    rho = truncated_ratio(slp, old, is_cap) if stale else jnp.exp(slp - old)
    per_token = -jnp.minimum(adv * rho, adv * jnp.clip(rho, 1.0 - clip_eps, 1.0 + clip_eps))
    iw_metrics = {}
    if stale:
        _, iw_metrics = importance_weights(slp, old, mask, is_cap)
    metrics = {"reward": jnp.mean(rewards.astype(jnp.float32)), "divergence": masked_mean(f_r, mask),
               "per_token_divergence": f_r,
               "advantage": masked_mean(adv, mask),
               "clip_fraction": masked_mean((jnp.abs(rho - 1.0) > clip_eps).astype(jnp.float32), mask)}
    if sampler_logprobs is not None:
        metrics["logprob_mismatch"] = masked_mean(jnp.abs(jax.lax.stop_gradient(slp) - old), mask)
    metrics.update(iw_metrics)
    return masked_mean(per_token, mask, normalize), metrics
