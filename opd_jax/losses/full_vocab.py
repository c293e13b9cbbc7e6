"""Exact divergences over the vocabulary, and top-k teacher distillation with a tail bucket.

Shapes: logits [..., V]; mask [B, T]; per-position results [...] (the leading dims of the logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd_jax.losses.fdiv import get_fdiv
from opd_jax.losses.masking import clean, masked_mean


def _log_probs(logits, temperature):
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def divergence_from_logprobs(student_lp, teacher_lp, kind, *, beta=0.5, alpha=0.5):
    """D_f(q || pi) = sum_y pi(y) f(q(y)/pi(y)) over the last axis, from normalised log-probs."""
    fd = get_fdiv(kind, beta=beta, alpha=alpha)
    return jnp.sum(fd.perspective(student_lp, jax.lax.stop_gradient(teacher_lp)), axis=-1)


def divergence(student_logits, teacher_logits, kind, *, beta=0.5, alpha=0.5, temperature=1.0):
    """Exact per-position divergence D_f(q_T || pi_T) over the last axis.

    pi_T = softmax(student_logits / T), q_T = softmax(teacher_logits / T) (the temperature divides
    both rows). kind: forward_kl = KL(q || pi), reverse_kl = KL(pi || q), jsd (beta: 0 -> forward
    KL, 1 -> reverse KL, between: beta KL(q || M) + (1-beta) KL(pi || M), M = beta q + (1-beta) pi),
    tv, hellinger, alpha. Differentiable in the student logits; the teacher carries no gradient.
    [..., V] x [..., V] -> [...] float32.
    """
    return divergence_from_logprobs(_log_probs(student_logits, temperature),
                                    _log_probs(jax.lax.stop_gradient(teacher_logits), temperature),
                                    kind, beta=beta, alpha=alpha)


def full_vocab_loss(student_logits, teacher_logits, mask, kind="reverse_kl", *, beta=0.5, alpha=0.5,
                    temperature=1.0, normalize="token"):
    """Masked mean of `divergence` over generated tokens -> (loss, metrics).

    student_logits, teacher_logits [B, T, V] (position t predicts token t+1 of the completion, already
    aligned with mask [B, T]). Metrics: divergence, top1_agreement (argmax equal), tokens.
    """
    keep = mask[..., None].astype(bool)
    student_logits, teacher_logits = clean(student_logits, keep), clean(teacher_logits, keep)
    d = divergence(student_logits, teacher_logits, kind, beta=beta, alpha=alpha, temperature=temperature)
    loss = masked_mean(d, mask, normalize)
    agree = (jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32)
    metrics = {"divergence": jax.lax.stop_gradient(loss), "per_token_divergence": jax.lax.stop_gradient(d),
               "top1_agreement": masked_mean(agree, mask),
               "tokens": jnp.sum(mask.astype(jnp.float32))}
    return loss, metrics


def _log1mexp(x):
    """log(1 - e^x) for x <= 0, accurate near both ends."""
    x = jnp.minimum(x, -1e-7)
    return jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def topk_buckets(logprobs_at_ids):
    """k log-probs [..., k] -> k+1 bucket log-probs [..., k+1]: the k tokens and the tail
    log(1 - sum_i p_i)."""
    tail = _log1mexp(jax.nn.logsumexp(logprobs_at_ids, axis=-1, keepdims=True))
    return jnp.concatenate([logprobs_at_ids, tail], axis=-1)


def topk_distill_loss(student_logits, teacher_topk_logprobs, teacher_topk_ids, mask, kind="reverse_kl", *,
                      beta=0.5, alpha=0.5, temperature=1.0, normalize="token"):
    """Distil from the teacher's top-k only, with a tail bucket so no mass is dropped.

    The teacher gives log q(i) for its k best tokens i (teacher_topk_logprobs [B, T, k], ids
    [B, T, k], already at the shared temperature). Both distributions are collapsed to k+1
    buckets: the k tokens, and the tail with mass 1 - sum_i p(i). D_f is taken over the buckets,
    so k = 1 still compares p(top token) and p(rest) and is not a zero loss.
    student_logits [B, T, V]. Metrics: divergence, tail_mass (teacher), student_tail_mass,
    top1_agreement.
    """
    keep = mask[..., None].astype(bool)
    student_logits = clean(student_logits, keep)
    teacher_topk_logprobs = clean(teacher_topk_logprobs, keep, -30.0)
    slp = _log_probs(student_logits, temperature)
    s_at = jnp.take_along_axis(slp, teacher_topk_ids, axis=-1)
    t_lp = jax.lax.stop_gradient(teacher_topk_logprobs.astype(jnp.float32))
    s_b, t_b = topk_buckets(s_at), topk_buckets(t_lp)
    d = divergence_from_logprobs(s_b, t_b, kind, beta=beta, alpha=alpha)
    loss = masked_mean(d, mask, normalize)
    best = jnp.take_along_axis(teacher_topk_ids, jnp.argmax(t_lp, -1)[..., None], -1)[..., 0]
    agree = (jnp.argmax(student_logits, -1) == best).astype(jnp.float32)
    metrics = {"divergence": jax.lax.stop_gradient(loss), "per_token_divergence": jax.lax.stop_gradient(d),
               "tail_mass": masked_mean(jnp.exp(t_b[..., -1]), mask),
               "student_tail_mass": jax.lax.stop_gradient(masked_mean(jnp.exp(s_b[..., -1]), mask)),
               "top1_agreement": masked_mean(agree, mask), "tokens": jnp.sum(mask.astype(jnp.float32))}
    return loss, metrics


def teacher_topk(teacher_logits, k, temperature=1.0):
    """The teacher's top-k (log-probs, ids) at the given temperature; [..., V] -> 2 x [..., k]."""
    lp = _log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
    vals, ids = jax.lax.top_k(lp, k)
    return vals, ids
