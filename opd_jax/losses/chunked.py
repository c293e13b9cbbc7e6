"""Full-vocabulary divergence from hidden states, in chunks, so [B, T, V] logits never exist.

    D_t = sum_y pi_t(y) f(q_t(y) / pi_t(y)),   pi_t = softmax(h_t W / T),   q_t = softmax(h'_t W' / T)

The sequence is cut into chunks of `seq_chunk` positions and processed by a `lax.scan` whose body
is wrapped in `jax.checkpoint`: the backward pass recomputes each chunk's logits instead of keeping
them, so peak temporary memory is O(B * seq_chunk * V) rather than O(B * T * V). With
`vocab_chunk`, each chunk's vocabulary is also cut: a first scan accumulates log-sum-exp (and the
argmax for the agreement metric) over vocabulary slices, a second sums pi f(q/pi) slice by slice,
both checkpointed, so the peak is O(B * seq_chunk * vocab_chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd_jax.blocks import pad_axis as _pad_axis, split_blocks as _chunks
from opd_jax.errors import OpdError
from opd_jax.losses.fdiv import get_fdiv
from opd_jax.losses.full_vocab import topk_buckets
from opd_jax.losses.masking import masked_mean

_PAD = -1e30  # logit of a padded vocabulary column: probability exactly 0, differences stay finite


def by_chunk(c: int, *xs):
    """Each x [B, T, ...] cut into chunks of c positions along T (the tail padded): [n, B, c, ...]."""
    out = tuple(_chunks(_pad_axis(x, 1, c), 1, c) for x in xs)
    return out[0] if len(out) == 1 else out


def chunk_ids(ids, b: int, t: int):
    """The sampled ids [B, T] the losses read log pi at, or zeros when none are given."""
    return jnp.zeros((b, t), jnp.int32) if ids is None else ids


def _logits_fn(hidden, w, temperature):
    return jnp.einsum("bcd,dv->bcv", hidden, w, preferred_element_type=jnp.float32) / temperature


def chunked_divergence(student_hidden, student_w, kind="reverse_kl", *, teacher_hidden=None, teacher_w=None,
                       teacher_logits=None, beta=0.5, alpha=0.5, temperature=1.0, seq_chunk=128, vocab_chunk=None,
                       ids=None):
    """Exact per-position divergence and argmax agreement, chunk by chunk -> (d [B, T], agree [B, T]).

    student_hidden [B, T, D], student_w [D, V]; the teacher as teacher_hidden [B, T, D'] with
    teacher_w [D', V], or as teacher_logits [B, T, V] (any dtype; sliced chunk by chunk).
    d_t = sum_y pi_t(y) f(q_t(y) / pi_t(y)) (differentiable in the student), agree_t = 1 when both
    argmaxes are equal. Every position is computed; the caller masks. With `ids` [B, T] also
    log pi_t(ids_t) [B, T] from the same pass (no gradient): -> (d, agree, token_logprob).
    """
    fd = get_fdiv(kind, beta=beta, alpha=alpha)
    b, t, _ = student_hidden.shape
    v = student_w.shape[1]
    if teacher_logits is None and (teacher_hidden is None or teacher_w is None):
        raise ValueError("give the teacher as teacher_logits or as teacher_hidden + teacher_w")
    c = min(seq_chunk, t)
    sh, idc = by_chunk(c, student_hidden, chunk_ids(ids, b, t))  # [n, B, C, D], [n, B, C]
    if teacher_logits is not None:
        teacher = (by_chunk(c, jax.lax.stop_gradient(teacher_logits)),)
    else:
        teacher = (by_chunk(c, jax.lax.stop_gradient(teacher_hidden)),)
        teacher_w = jax.lax.stop_gradient(teacher_w)

    if vocab_chunk is None or vocab_chunk >= v:
        def chunk(_, xs):
            s_log = _logits_fn(xs[0], student_w, temperature)
            t_log = (xs[1].astype(jnp.float32) / temperature if teacher_logits is not None
                     else _logits_fn(xs[1], teacher_w, temperature))
            lp, lq = jax.nn.log_softmax(s_log, -1), jax.nn.log_softmax(t_log, -1)
            d = jnp.sum(fd.perspective(lp, lq), -1)
            agree = (jnp.argmax(s_log, -1) == jnp.argmax(t_log, -1)).astype(jnp.float32)
            return None, (d, agree, jnp.take_along_axis(lp, xs[2][..., None], -1)[..., 0])
    else:
        chunk = _vocab_chunked_body(fd, student_w, teacher_w, teacher_logits is not None, v, vocab_chunk,
                                    temperature)

    _, (d, agree, tok) = jax.lax.scan(jax.checkpoint(chunk), None, (sh,) + teacher + (idc,))
    out = _unchunk(d, b, t), _unchunk(agree, b, t)
    return out if ids is None else out + (jax.lax.stop_gradient(_unchunk(tok, b, t)),)


def _unchunk(x, b, t):
    """[n, B, C] per-chunk results -> [B, T] (the padded tail dropped)."""
    return jnp.moveaxis(x, 0, 1).reshape(b, -1)[:, :t]


def chunked_divergence_loss(student_hidden, student_w, mask, kind="reverse_kl", *, teacher_hidden=None,
                            teacher_w=None, teacher_logits=None, beta=0.5, alpha=0.5, temperature=1.0,
                            normalize="token", seq_chunk=128, vocab_chunk=None, ids=None):
    """Masked mean of `chunked_divergence` over mask [B, T] -> (loss, metrics).

    Equal in value and gradient to `full_vocab_loss(h @ W, h' @ W', ...)` without any [B, T, V]
    array. Metrics: divergence, per_token_divergence, top1_agreement, tokens (and token_logprob
    [B, T], log pi(ids_t), when the sampled `ids` [B, T] are given).
    """
    out = chunked_divergence(student_hidden, student_w, kind, teacher_hidden=teacher_hidden,
                             teacher_w=teacher_w, teacher_logits=teacher_logits, beta=beta, alpha=alpha,
                             temperature=temperature, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk, ids=ids)
    d, agree = out[:2]
    loss = masked_mean(d, mask, normalize)
    m = {"divergence": jax.lax.stop_gradient(loss),
         "per_token_divergence": jax.lax.stop_gradient(d),
         "top1_agreement": jax.lax.stop_gradient(masked_mean(agree, mask)),
         "tokens": jnp.sum(mask.astype(jnp.float32))}
    if ids is not None:
        m["token_logprob"] = out[2]
    return loss, m


def chunked_topk_loss(student_hidden, student_w, teacher_hidden, teacher_w, mask, k, kind="reverse_kl", *,
                      beta=0.5, alpha=0.5, temperature=1.0, normalize="token", seq_chunk=128, ids=None,
                      teacher_topk=None, top_from="teacher"):
    """`topk_distill_loss` from hidden states, chunk by chunk, so neither model's [B, T, V] logits exist.

    Per chunk of positions: q = log_softmax(h' W' / T), its top k (ids i_1..i_k); pi = log_softmax(h W / T);
    both collapsed to k+1 buckets (the k ids and the tail 1 - sum p(i_j)) and
    d_t = sum_b pi_b f(q_b / pi_b) over the buckets. student_hidden [B, T, D], student_w [D, V],
    teacher_hidden [B, T, D'], teacher_w [D', V], mask [B, T] -> (loss, metrics: divergence,
    per_token_divergence, tail_mass (teacher), student_tail_mass, top1_agreement, tokens; with the
    sampled `ids` [B, T] also token_logprob [B, T] = log pi(ids_t), from the same pass).
    teacher_topk = (log-probs [B, T, k], ids [B, T, k]) instead of teacher_hidden / teacher_w: the
    teacher's top k already formed (a served teacher's hand-over).
    top_from="student": the k ids are the student's own top k (chosen without gradient) and the teacher
    is read at them: with reverse KL, KL over the student's top k + tail, a lower bound on the full
    KL(pi || q) that covers the student's likeliest tokens (needs the teacher's hidden states).
    """
    if top_from not in ("teacher", "student"):
        raise OpdError(f"config loss.topk_from must be teacher or student, got {top_from!r}")
    if top_from == "student" and teacher_topk is not None:
        raise OpdError("loss.topk_from=student reads the teacher at the student's top k, which a top-k hand-over "
                       "(a served teacher) does not carry; use loss.topk_from teacher")
    fd = get_fdiv(kind, beta=beta, alpha=alpha)
    b, t, _ = student_hidden.shape
    c = min(seq_chunk, t)
    sh, idc = by_chunk(c, student_hidden, chunk_ids(ids, b, t))
    given = teacher_topk is not None
    if given:
        th = tuple(by_chunk(c, jax.lax.stop_gradient(x)) for x in teacher_topk)
    else:
        th = by_chunk(c, jax.lax.stop_gradient(teacher_hidden))
        teacher_w = jax.lax.stop_gradient(teacher_w)

    def chunk(_, xs):
        s_log = _logits_fn(xs[0], student_w, temperature)
        s_lp = jax.nn.log_softmax(s_log, -1)
        if given:
            t_lp, top = xs[1][0].astype(jnp.float32), xs[1][1]
            t_first = top[..., 0]
        else:
            t_all = jax.nn.log_softmax(_logits_fn(xs[1], teacher_w, temperature), -1)
            if top_from == "student":
                top = jax.lax.top_k(jax.lax.stop_gradient(s_lp), k)[1]
                t_lp, t_first = jnp.take_along_axis(t_all, top, -1), jnp.argmax(t_all, -1)
            else:
                t_lp, top = jax.lax.top_k(t_all, k)
                t_first = top[..., 0]
        s_at = jnp.take_along_axis(s_lp, top, -1)
        s_b, t_b = topk_buckets(s_at), topk_buckets(t_lp)
        d = jnp.sum(fd.perspective(s_b, t_b), -1)
        agree = (jnp.argmax(s_log, -1) == t_first).astype(jnp.float32)
        picked = jnp.take_along_axis(s_lp, xs[2][..., None], -1)[..., 0]
        return None, (d, agree, jnp.exp(t_b[..., -1]), jnp.exp(s_b[..., -1]), picked)

    _, outs = jax.lax.scan(jax.checkpoint(chunk), None, (sh, th, idc))
    d, agree, t_tail, s_tail, picked = (_unchunk(x, b, t) for x in outs)
    loss = masked_mean(d, mask, normalize)
    sg = jax.lax.stop_gradient
    m = {"divergence": sg(loss), "per_token_divergence": sg(d),
         "tail_mass": sg(masked_mean(t_tail, mask)), "student_tail_mass": sg(masked_mean(s_tail, mask)),
         "top1_agreement": sg(masked_mean(agree, mask)), "tokens": jnp.sum(mask.astype(jnp.float32))}
    if ids is not None:
        m["token_logprob"] = sg(picked)
    return loss, m


def _vocab_chunked_body(fd, student_w, teacher_w, teacher_is_logits, v, vc, temperature):
    """Scan body over one sequence chunk that also walks the vocabulary in slices of `vc`."""
    n_v = -(-v // vc)
    pad_bias = _chunks(_pad_axis(jnp.zeros((v,), jnp.float32), 0, vc, _PAD), 0, vc)  # [n_v, vc]
    ws = _chunks(_pad_axis(student_w, 1, vc), 1, vc)  # [n_v, D, vc]
    wt = None if teacher_is_logits else _chunks(_pad_axis(teacher_w, 1, vc), 1, vc)

    def slice_logits(sh, th, j):
        s = _logits_fn(sh, ws[j], temperature) + pad_bias[j]
        if teacher_is_logits:
            tl = jax.lax.dynamic_slice_in_dim(_pad_axis(th, 2, vc, _PAD), j * vc, vc, axis=2)
            tt = tl.astype(jnp.float32) / temperature
        else:
            tt = _logits_fn(th, wt[j], temperature) + pad_bias[j]
        return s, tt

    def body(_, xs):
        sh, th, idc = xs
        bc = sh.shape[:2]

        def stats(carry, j):  # running log-sum-exp and argmax of both models over vocab slices
            s, tt = slice_logits(sh, th, j)
            s_lse, t_lse, s_max, s_arg, t_max, t_arg = carry
            s_new, t_new = jnp.max(s, -1), jnp.max(tt, -1)
            s_arg = jnp.where(s_new > s_max, jnp.argmax(s, -1) + j * vc, s_arg)
            t_arg = jnp.where(t_new > t_max, jnp.argmax(tt, -1) + j * vc, t_arg)
            return (jnp.logaddexp(s_lse, jax.nn.logsumexp(s, -1)), jnp.logaddexp(t_lse, jax.nn.logsumexp(tt, -1)),
                    jnp.maximum(s_max, s_new), s_arg, jnp.maximum(t_max, t_new), t_arg), None

        neg = jnp.full(bc, -jnp.inf, jnp.float32)
        zero = jnp.zeros(bc, jnp.int32)
        (s_lse, t_lse, _, s_arg, _, t_arg), _ = jax.lax.scan(
            jax.checkpoint(stats), (neg, neg, neg, zero, neg, zero), jnp.arange(n_v))

        def accumulate(total, j):
            s, tt = slice_logits(sh, th, j)
            return total + jnp.sum(fd.perspective(s - s_lse[..., None], tt - t_lse[..., None]), -1), None

        d, _ = jax.lax.scan(jax.checkpoint(accumulate), jnp.zeros(bc, jnp.float32), jnp.arange(n_v))
        picked = jnp.einsum("bcd,dbc->bc", sh, jnp.take(student_w, idc, axis=1),
                            preferred_element_type=jnp.float32) / temperature - s_lse
        return None, (d, (s_arg == t_arg).astype(jnp.float32), picked)

    return body


def chunked_token_logprobs(hidden, w, ids, *, temperature=1.0, seq_chunk=128):
    """log softmax(h_t W / T)[ids_t] for every position, chunk by chunk (differentiable).

    hidden [B, T, D], w [D, V], ids [B, T] -> [B, T] float32, without a [B, T, V] array.
    """
    b, t, _ = hidden.shape
    c = min(seq_chunk, t)
    hs, idc = by_chunk(c, hidden, ids)

    def body(_, xs):
        logits = _logits_fn(xs[0], w, temperature)
        picked = jnp.take_along_axis(logits, xs[1][..., None], -1)[..., 0]
        return None, picked - jax.nn.logsumexp(logits, -1)

    _, lp = jax.lax.scan(jax.checkpoint(body), None, (hs, idc))
    return _unchunk(lp, b, t)


def chunked_topk(hidden, w, k: int, *, temperature=1.0, seq_chunk=128):
    """The top k of log softmax(h_t W / T) at every position, chunk by chunk (no gradient).

    hidden [B, T, D], w [D, V] -> (log-probs [B, T, k] float32, ids [B, T, k] int32), without a
    [B, T, V] array.
    """
    b, t, _ = hidden.shape
    c = min(seq_chunk, t)
    hs = by_chunk(c, jax.lax.stop_gradient(hidden))

    def body(_, x):
        return None, jax.lax.top_k(jax.nn.log_softmax(_logits_fn(x, w, temperature), -1), k)

    _, (lp, ids) = jax.lax.scan(body, None, hs)
    back = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, -1, k))[:, :t]  # noqa: E731
    return back(lp), back(ids)
