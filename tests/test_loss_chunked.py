"""The chunked full-vocabulary divergence equals the plain one, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses as L

B, T, D, DT, V = 2, 11, 8, 6, 37
RNG = np.random.RandomState(0)
HS = jnp.asarray(RNG.normal(size=(B, T, D)).astype(np.float32))
WS = jnp.asarray(RNG.normal(size=(D, V)).astype(np.float32) * 0.7)
HT = jnp.asarray(RNG.normal(size=(B, T, DT)).astype(np.float32))
WT = jnp.asarray(RNG.normal(size=(DT, V)).astype(np.float32) * 0.7)
MASK = jnp.asarray((RNG.uniform(size=(B, T)) > 0.3).astype(np.int32))


def plain(hs, ws, kind, **kw):
    return L.full_vocab_loss(hs @ ws, HT @ WT, MASK, kind, **kw)


@pytest.mark.parametrize("kind,kw", [("reverse_kl", {}), ("forward_kl", {"temperature": 0.8}),
                                     ("jsd", {"beta": 0.3}), ("hellinger", {}), ("alpha", {"alpha": 1.5})])
@pytest.mark.parametrize("seq_chunk,vocab_chunk", [(4, None), (3, 10), (16, 8), (5, 37)])
def test_chunked_equals_unchunked(kind, kw, seq_chunk, vocab_chunk):
    ref_fn = lambda hs, ws: plain(hs, ws, kind, **kw)[0]
    got_fn = lambda hs, ws: L.chunked_divergence_loss(hs, ws, MASK, kind, teacher_hidden=HT, teacher_w=WT,
                                                      seq_chunk=seq_chunk, vocab_chunk=vocab_chunk, **kw)[0]
    ref_v, ref_g = jax.value_and_grad(ref_fn, argnums=(0, 1))(HS, WS)
    got_v, got_g = jax.value_and_grad(got_fn, argnums=(0, 1))(HS, WS)
    np.testing.assert_allclose(got_v, ref_v, rtol=1e-5)
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(np.asarray(b)).max()))


def test_teacher_as_logits_and_metrics():
    tl = (HT @ WT).astype(jnp.bfloat16)
    for vc in (None, 9):
        got, m = L.chunked_divergence_loss(HS, WS, MASK, "forward_kl", teacher_logits=tl, seq_chunk=4, vocab_chunk=vc)
        ref, rm = L.full_vocab_loss(HS @ WS, tl.astype(jnp.float32), MASK, "forward_kl")
        np.testing.assert_allclose(got, ref, rtol=1e-5)
        np.testing.assert_allclose(m["top1_agreement"], rm["top1_agreement"], rtol=1e-6)
    seq, _ = L.chunked_divergence_loss(HS, WS, MASK, "reverse_kl", teacher_hidden=HT, teacher_w=WT,
                                       normalize="sequence", seq_chunk=4)
    np.testing.assert_allclose(seq, plain(HS, WS, "reverse_kl", normalize="sequence")[0], rtol=1e-5)


def test_no_full_logits_in_the_chunked_program():
    """The compiled chunked loss+grad never holds a [B, T, V] float32 buffer: its temporaries are
    several times smaller than the plain version's at a shape where logits dominate."""
    b, t, d, v = 2, 256, 16, 4096
    hs = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    ws = jax.ShapeDtypeStruct((d, v), jnp.float32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def naive(hs, ws, ht, mask):
        return L.full_vocab_loss(hs @ ws, ht @ ws, mask)[0]

    def chunked(hs, ws, ht, mask):
        return L.chunked_divergence_loss(hs, ws, mask, teacher_hidden=ht, teacher_w=ws, seq_chunk=16,
                                         vocab_chunk=1024)[0]

    def temp_bytes(fn):
        lowered = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(hs, ws, hs, mask)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    full = b * t * v * 4
    assert temp_bytes(naive) >= full  # the plain version holds at least one full logits array
    assert temp_bytes(chunked) < full / 4


@pytest.mark.parametrize("kind,k,temperature,seq_chunk", [("reverse_kl", 5, 1.0, 4), ("forward_kl", 1, 0.7, 3),
                                                           ("jsd", 8, 1.3, 16)])
def test_chunked_topk_equals_plain_topk(kind, k, temperature, seq_chunk):
    """`chunked_topk_loss` from hidden states == `topk_distill_loss` on materialised logits with the
    teacher's top-k taken from its full log-softmax (value, gradient, metrics)."""
    def ref_fn(hs, ws):
        vals, ids = L.teacher_topk(HT @ WT, k, temperature)
        return L.topk_distill_loss(hs @ ws, vals, ids, MASK, kind, temperature=temperature)

    def got_fn(hs, ws):
        return L.chunked_topk_loss(hs, ws, HT, WT, MASK, k, kind, temperature=temperature, seq_chunk=seq_chunk)

    (ref_v, rm), ref_g = jax.value_and_grad(ref_fn, argnums=(0, 1), has_aux=True)(HS, WS)
    (got_v, gm), got_g = jax.value_and_grad(got_fn, argnums=(0, 1), has_aux=True)(HS, WS)
    np.testing.assert_allclose(got_v, ref_v, rtol=1e-5)
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(np.asarray(b)).max()))
    for key in ("tail_mass", "student_tail_mass", "top1_agreement", "tokens"):
        np.testing.assert_allclose(gm[key], rm[key], rtol=1e-5, err_msg=key)
    keep = np.asarray(MASK).astype(bool)
    np.testing.assert_allclose(np.asarray(gm["per_token_divergence"])[keep],
                               np.asarray(rm["per_token_divergence"])[keep], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [1, 4])
def test_student_topk_reverse_kl_equals_numpy_and_bounds_the_full_kl(k):
    """loss.topk_from=student: per position, S = the student's k likeliest ids; p and q collapsed to S and
    a tail bucket; d = sum_b p_b log(p_b / q_b) (numpy, float64). It never exceeds the full KL(p || q)
    (merging buckets cannot raise a KL), and its gradient is that of the bucketed KL with S held fixed."""
    got, m = L.chunked_topk_loss(HS, WS, HT, WT, MASK, k, "reverse_kl", seq_chunk=4, top_from="student")
    s = np.asarray(HS @ WS, np.float64)
    t = np.asarray(HT @ WT, np.float64)
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    q = np.exp(t - t.max(-1, keepdims=True)); q /= q.sum(-1, keepdims=True)
    top = np.argsort(-p, -1)[..., :k]
    pb = np.concatenate([np.take_along_axis(p, top, -1), 1 - np.take_along_axis(p, top, -1).sum(-1, keepdims=True)], -1)
    qb = np.concatenate([np.take_along_axis(q, top, -1), 1 - np.take_along_axis(q, top, -1).sum(-1, keepdims=True)], -1)
    d = (pb * np.log(pb / qb)).sum(-1)
    keep = np.asarray(MASK).astype(bool)
    np.testing.assert_allclose(np.asarray(m["per_token_divergence"])[keep], d[keep], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(got), d[keep].mean(), rtol=1e-4)
    full = (p * np.log(p / q)).sum(-1)
    assert np.all(d[keep] <= full[keep] + 1e-6) and np.all(d[keep] >= -1e-7)
    np.testing.assert_allclose(float(m["top1_agreement"]), (p.argmax(-1) == q.argmax(-1))[keep].mean())

    def fixed_set(hs):  # the same bucketed KL written with the numpy-chosen ids, differentiated by jax
        lp, lq = jax.nn.log_softmax(hs @ WS, -1), jax.nn.log_softmax(HT @ WT, -1)
        lp_s, lq_s = jnp.take_along_axis(lp, top, -1), jnp.take_along_axis(lq, top, -1)
        lp_b = jnp.concatenate([lp_s, jnp.log1p(-jnp.exp(lp_s).sum(-1, keepdims=True))], -1)
        lq_b = jnp.concatenate([lq_s, jnp.log1p(-jnp.exp(lq_s).sum(-1, keepdims=True))], -1)
        return jnp.sum((jnp.exp(lp_b) * (lp_b - lq_b)).sum(-1) * MASK) / MASK.sum()

    g = jax.grad(lambda hs: L.chunked_topk_loss(hs, WS, HT, WT, MASK, k, "reverse_kl", seq_chunk=4,
                                                top_from="student")[0])(HS)
    np.testing.assert_allclose(g, jax.grad(fixed_set)(HS), rtol=1e-4, atol=1e-6)


def test_the_topk_estimator_takes_its_ids_from_loss_topk_from():
    from opd_jax.config import LossConfig
    from opd_jax.losses.registry import estimator_for

    from opd_jax.batch import Part

    b = Part(jnp.zeros((B, T + 1), jnp.int32), jnp.ones((B, 1), jnp.int32), MASK)  # the completion ids: the last T
    out = {}
    for side in ("teacher", "student"):
        lc = LossConfig(estimator_type="topk", kind="reverse_kl", topk=4, topk_from=side, seq_chunk=4)
        out[side] = float(estimator_for(lc).loss(HS, WS, b, HT, WT, lc, group_size=1, temperature=1.0)[0])
        ref = L.chunked_topk_loss(HS, WS, HT, WT, MASK, 4, "reverse_kl", seq_chunk=4, top_from=side)[0]
        np.testing.assert_allclose(out[side], float(ref), rtol=1e-6)
    assert abs(out["teacher"] - out["student"]) > 1e-3
