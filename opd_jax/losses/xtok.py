"""Divergence to a teacher with another tokenizer, chunk by chunk: the teacher's distribution over its
own vocabulary is moved onto the student's by a static map (`opd_jax.xtok.vocab_map`) with a segment
sum inside each chunk, so no [B, N, V] array exists on either side.

At a student position t whose token starts at the same byte as a teacher token (the teacher's hidden
state h'_t is gathered there by the rollout; other positions are masked), with lq = log softmax(h'_t W'/T)
over the teacher vocabulary V_t and lp = log softmax(h_t W/T) over the student's V_s:

  bpm  (byte-prefix marginalisation): log q~(s) = logsumexp_{u : map(u) = s} lq(u) for every student token
       s; the residual (teacher tokens no student token is a byte prefix of) is dropped and q~ renormalised
       over V_s; a student token no teacher token maps to gets q~ = eps (EMPTY_LOGPROB) before
       renormalising, so every f-divergence stays finite. d_t = sum_s pi(s) f(q~(s) / pi(s)).
  uld  (universal logit distillation, GOLD's baseline): the matched set is the token pairs with identical
       bytes (map(u) = s); d_t = D_f over the matched tokens, both sides renormalised over the matched set,
       plus sum_i |sort(pi_unmatched)_i - sort(q_unmatched)_i| (the L1 between the two unmatched
       distributions, sorted, zero-padded to one length).

With one tokenizer on both sides (map = identity) both reduce to the same-tokenizer D_f exactly.
topk > 0 (bpm only): D_f over the top k of q~ (or of pi, top_from="student") plus the tail bucket, as
`chunked_topk_loss` does for one tokenizer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from opd_jax.blocks import pad_axis as _pad_axis
from opd_jax.losses.chunked import _logits_fn, _unchunk, by_chunk, chunk_ids
from opd_jax.losses.fdiv import get_fdiv
from opd_jax.losses.full_vocab import topk_buckets
from opd_jax.losses.masking import masked_mean

EMPTY_LOGPROB = math.log(1e-6)  # bpm: a student token no teacher token maps to (before renormalising)
_ZERO = -1e30  # log of an exact zero that stays finite (both sides zero: the bucket adds nothing)


def _segment_lse(lq, vmap, v_student: int):
    """lq [..., V_t] -> (log-sum-exp of lq over the teacher tokens mapped to each student token, the
    residual last [..., V_s + 1]; reached [V_s] bool: some teacher token maps there). vmap [V_t] int32
    (-1 = residual); a segment max / sum over the teacher axis."""
    seg = jnp.where(vmap < 0, v_student, vmap)
    x = jnp.moveaxis(lq, -1, 0)  # [V_t, ...]: segment ops run over the leading axis
    top = jax.ops.segment_max(x, seg, num_segments=v_student + 1)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jax.ops.segment_sum(jnp.exp(x - top[seg]), seg, num_segments=v_student + 1)
    reached = jax.ops.segment_sum(jnp.ones_like(seg), seg, num_segments=v_student + 1)[:v_student] > 0
    return jnp.moveaxis(jnp.log(total) + top, 0, -1), reached


def _renormalised(lse, reached, v_student: int):
    """bpm's log q~ [..., V_s] from `_segment_lse`: residual dropped, unreached tokens at EMPTY_LOGPROB."""
    return jax.nn.log_softmax(jnp.where(reached, lse[..., :v_student], EMPTY_LOGPROB), -1)


def project_logprobs(lq, vmap, v_student: int):
    """lq [..., V_t] teacher log-probs -> (log q~ [..., V_s] renormalised over the student vocabulary,
    residual mass [...], reached [V_s] bool: some teacher token maps there); vmap [V_t] int32 (-1 =
    residual)."""
    lse, reached = _segment_lse(lq, vmap, v_student)
    return _renormalised(lse, reached, v_student), jnp.exp(lse[..., v_student]), reached


def _uld_terms(fd, lp, lq, lse, matched, vmap, v_student: int):
    """ULD per position: D_f over the identical-bytes pairs (each side renormalised over them) plus the
    sorted-L1 between the unmatched parts. lp [..., V_s], lq [..., V_t], lse / matched: `_segment_lse`
    of lq under the identical-bytes map -> [...]."""
    lp_m = jnp.where(matched, lp, -jnp.inf)
    lq_m = jnp.where(matched, lse[..., :v_student], -jnp.inf)
    lp_m = jnp.maximum(lp_m - jnp.maximum(jax.nn.logsumexp(lp_m, -1, keepdims=True), _ZERO), _ZERO)
    lq_m = jnp.maximum(lq_m - jnp.maximum(jax.nn.logsumexp(lq_m, -1, keepdims=True), _ZERO), _ZERO)
    d = jnp.sum(jnp.where(matched, fd.perspective(lp_m, lq_m), 0.0), -1)
    p_un = jnp.where(matched, 0.0, jnp.exp(lp))
    q_un = jnp.where(vmap < 0, jnp.exp(lq), 0.0)
    n = max(p_un.shape[-1], q_un.shape[-1])
    p_sorted = -jnp.sort(-_pad_axis(p_un, p_un.ndim - 1, n), -1)[..., :n]
    q_sorted = -jnp.sort(-_pad_axis(q_un, q_un.ndim - 1, n), -1)[..., :n]
    return d + jnp.sum(jnp.abs(p_sorted - q_sorted), -1)


def xtok_divergence_loss(student_hidden, student_w, teacher_hidden, teacher_w, vmap, mask, how="bpm",
                         kind="reverse_kl", *, beta=0.5, alpha=0.5, temperature=1.0, normalize="token",
                         seq_chunk=128, ids=None, topk=0, top_from="teacher"):
    """Masked mean of the cross-tokenizer divergence (module docstring) -> (loss, metrics).

    student_hidden [B, T, D], student_w [D, V_s]; teacher_hidden [B, T, D_t] (the teacher's states at
    the aligned positions), teacher_w [D_t, V_t], vmap [V_t] int32; mask [B, T] (the aligned positions).
    Metrics: divergence, per_token_divergence, top1_agreement (student argmax = the argmax of the
    projected teacher), residual_mass (bpm: teacher mass no student token prefixes), tokens; with
    `ids` [B, T] also token_logprob (log pi(ids_t), no gradient).
    """
    fd = get_fdiv(kind, beta=beta, alpha=alpha)
    b, t, _ = student_hidden.shape
    v = student_w.shape[1]
    c = min(seq_chunk, t)
    sh, th, idc = by_chunk(c, student_hidden, jax.lax.stop_gradient(teacher_hidden), chunk_ids(ids, b, t))
    teacher_w = jax.lax.stop_gradient(teacher_w)

    def chunk(_, xs):
        s_log = _logits_fn(xs[0], student_w, temperature)
        lp = jax.nn.log_softmax(s_log, -1)
        lq = jax.nn.log_softmax(_logits_fn(xs[1], teacher_w, temperature), -1)
        lse, reached = _segment_lse(lq, vmap, v)  # once per chunk, for every form below
        lq_s, residual = _renormalised(lse, reached, v), jnp.exp(lse[..., v])
        if how == "uld":
            d = _uld_terms(fd, lp, lq, lse, reached, vmap, v)
        elif topk:
            top = jax.lax.top_k(jax.lax.stop_gradient(lp if top_from == "student" else lq_s), topk)[1]
            s_b = topk_buckets(jnp.take_along_axis(lp, top, -1))
            t_b = topk_buckets(jnp.take_along_axis(lq_s, top, -1))
            d = jnp.sum(fd.perspective(s_b, t_b), -1)
        else:
            d = jnp.sum(fd.perspective(lp, lq_s), -1)
        agree = (jnp.argmax(s_log, -1) == jnp.argmax(lq_s, -1)).astype(jnp.float32)
        picked = jnp.take_along_axis(lp, xs[2][..., None], -1)[..., 0]
        return None, (d, agree, residual, picked)

    _, outs = jax.lax.scan(jax.checkpoint(chunk), None, (sh, th, idc))
    d, agree, residual, picked = (_unchunk(x, b, t) for x in outs)
    loss = masked_mean(d, mask, normalize)
    sg = jax.lax.stop_gradient
    m = {"divergence": sg(loss), "per_token_divergence": sg(d), "top1_agreement": sg(masked_mean(agree, mask)),
         "residual_mass": sg(masked_mean(residual, mask)), "tokens": jnp.sum(mask.astype(jnp.float32))}
    if ids is not None:
        m["token_logprob"] = sg(picked)
    return loss, m
