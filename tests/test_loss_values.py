"""Every divergence and loss against numpy / scipy on small hand-made distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import softmax as np_softmax
from scipy.stats import entropy

from references import divergence as ref_divergence

from opd_jax import OpdError
from opd_jax import losses as L

RNG = np.random.RandomState(0)
S_LOGITS = RNG.normal(size=(3, 5, 7)).astype(np.float32) * 1.5
T_LOGITS = RNG.normal(size=(3, 5, 7)).astype(np.float32) * 1.5


@pytest.mark.parametrize("kind,kw", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5}),
                                     ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.9}), ("tv", {}),
                                     ("hellinger", {}), ("alpha", {"alpha": 0.3}), ("alpha", {"alpha": 2.0}),
                                     ("proximal_kl", {"beta": 0.3}), ("proximal_kl", {"beta": 0.9})])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_divergence_matches_numpy(kind, kw, temperature):
    got = np.asarray(L.divergence(S_LOGITS, T_LOGITS, kind, temperature=temperature, **kw))
    p, q = np_softmax(S_LOGITS / temperature, -1), np_softmax(T_LOGITS / temperature, -1)
    np.testing.assert_allclose(got, ref_divergence(p.astype(np.float64), q.astype(np.float64), kind, **kw),
                               rtol=1e-5, atol=1e-6)
    assert got.shape == (3, 5)


def test_jsd_endpoints_are_exactly_the_kls():
    p, q = np_softmax(S_LOGITS, -1).astype(np.float64), np_softmax(T_LOGITS, -1).astype(np.float64)
    np.testing.assert_allclose(L.divergence(S_LOGITS, T_LOGITS, "jsd", beta=0.0), entropy(q, p, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(L.divergence(S_LOGITS, T_LOGITS, "jsd", beta=1.0), entropy(p, q, axis=-1), rtol=1e-5)
    # and the mixture form approaches them once divided by beta (1 - beta)
    for b, ref in [(1e-3, entropy(q, p, axis=-1)), (1 - 1e-3, entropy(p, q, axis=-1))]:
        got = np.asarray(L.divergence(S_LOGITS.astype(np.float64), T_LOGITS, "jsd", beta=b)) / (b * (1 - b))
        np.testing.assert_allclose(got, ref, rtol=2e-2)


def test_identical_distributions_give_zero_and_gradient_flows_only_to_the_student():
    for kind in L.KINDS:
        assert np.abs(np.asarray(L.divergence(S_LOGITS, S_LOGITS, kind))).max() < 1e-5
    gs, gt = jax.grad(lambda s, t: L.divergence(s, t, "forward_kl").sum(), argnums=(0, 1))(
        jnp.asarray(S_LOGITS), jnp.asarray(T_LOGITS))
    assert np.abs(np.asarray(gt)).max() == 0.0 and np.abs(np.asarray(gs)).max() > 1e-3
    # forward KL gradient in the student logits is pi - q (numpy)
    np.testing.assert_allclose(gs, np_softmax(S_LOGITS, -1) - np_softmax(T_LOGITS, -1), atol=1e-6)


def test_unknown_kind_and_bad_beta_are_clear_errors():
    with pytest.raises(OpdError, match="unknown divergence kind 'kl'.*reverse_kl"):
        L.divergence(S_LOGITS, T_LOGITS, "kl")
    with pytest.raises(OpdError, match="beta"):
        L.divergence(S_LOGITS, T_LOGITS, "jsd", beta=1.5)
    with pytest.raises(OpdError, match=r"proximal_kl beta .* must be in \(0, 1\], got 0.0"):
        L.divergence(S_LOGITS, T_LOGITS, "proximal_kl", beta=0.0)


def test_proximal_kl_reward_is_top_d_bounded_reward_and_beta_1_is_reverse_kl():
    """The sampled term's reward -f(l) is log(beta rho + 1 - beta) with rho = q(y)/pi(y) (numpy), bounded
    below by log(1 - beta) however small the teacher's probability."""
    fd = L.get_fdiv("proximal_kl", beta=0.25)
    lr = np.array([-60.0, -3.0, 0.0, 2.0], np.float32)
    np.testing.assert_allclose(-np.asarray(fd.f(jnp.asarray(lr))), np.log(0.25 * np.exp(lr.astype(np.float64)) + 0.75),
                               rtol=1e-6, atol=1e-7)
    assert -float(fd.f(jnp.float32(-1e4))) >= np.log(0.75) - 1e-6
    np.testing.assert_allclose(L.divergence(S_LOGITS, T_LOGITS, "proximal_kl", beta=1.0),
                               L.divergence(S_LOGITS, T_LOGITS, "reverse_kl"), rtol=1e-6)


MASK = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], np.int32)


def test_full_vocab_loss_masking_and_normalisation():
    d = ref_divergence(np_softmax(S_LOGITS, -1), np_softmax(T_LOGITS, -1), "reverse_kl")
    loss, m = L.full_vocab_loss(S_LOGITS, T_LOGITS, MASK, "reverse_kl")
    np.testing.assert_allclose(loss, (d * MASK).sum() / MASK.sum(), rtol=1e-5)
    seq, _ = L.full_vocab_loss(S_LOGITS, T_LOGITS, MASK, "reverse_kl", normalize="sequence")
    np.testing.assert_allclose(seq, ((d[0] * MASK[0]).sum() / 3 + (d[1] * MASK[1]).sum() / 2) / 2, rtol=1e-5)
    agree = (S_LOGITS.argmax(-1) == T_LOGITS.argmax(-1))
    np.testing.assert_allclose(m["top1_agreement"], (agree * MASK).sum() / MASK.sum(), rtol=1e-6)
    assert float(m["tokens"]) == 5


def test_masked_positions_change_nothing_even_when_nan():
    dirty_s, dirty_t = S_LOGITS.copy(), T_LOGITS.copy()
    dirty_s[MASK == 0] = np.nan
    dirty_t[MASK == 0] = np.inf
    f = lambda s, t: L.full_vocab_loss(s, t, MASK, "jsd")[0]
    clean_val, clean_grad = jax.value_and_grad(f)(jnp.asarray(S_LOGITS), jnp.asarray(T_LOGITS))
    val, grad = jax.value_and_grad(f)(jnp.asarray(dirty_s), jnp.asarray(dirty_t))
    np.testing.assert_allclose(val, clean_val, rtol=1e-6)
    np.testing.assert_allclose(grad, clean_grad, atol=1e-7)
    assert np.isfinite(np.asarray(grad)).all()


def test_all_masked_batch_is_zero_not_nan():
    zero = np.zeros_like(MASK)
    for loss_fn in (lambda s: L.full_vocab_loss(s, T_LOGITS, zero)[0],
                    lambda s: L.sampled_surrogate(s[..., 0], T_LOGITS[..., 0], zero, "forward_kl")[0],
                    lambda s: L.chunked_divergence_loss(s, jnp.eye(7), zero, teacher_logits=T_LOGITS)[0]):
        val, grad = jax.value_and_grad(loss_fn)(jnp.asarray(S_LOGITS))
        assert float(val) == 0.0 and np.abs(np.asarray(grad)).max() == 0.0


@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_with_tail_bucket_matches_numpy(k):
    q_full = np_softmax(T_LOGITS, -1)
    p_full = np_softmax(S_LOGITS, -1)
    ids = np.argsort(-T_LOGITS, -1)[..., :k]
    q_k = np.take_along_axis(q_full, ids, -1)
    p_k = np.take_along_axis(p_full, ids, -1)
    q_b = np.concatenate([q_k, np.maximum(1 - q_k.sum(-1, keepdims=True), 0)], -1)
    p_b = np.concatenate([p_k, np.maximum(1 - p_k.sum(-1, keepdims=True), 0)], -1)
    # with k = V the tail is empty: the reference is the plain divergence over the vocabulary
    ref = ref_divergence(p_b, q_b, "forward_kl") if k < 7 else ref_divergence(p_full, q_full, "forward_kl")
    vals, got_ids = L.teacher_topk(T_LOGITS, k)
    np.testing.assert_array_equal(got_ids, ids)
    loss, m = L.topk_distill_loss(S_LOGITS, vals, got_ids, MASK, "forward_kl")
    np.testing.assert_allclose(loss, (ref * MASK).sum() / MASK.sum(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["tail_mass"], (q_b[..., -1] * MASK).sum() / MASK.sum(), rtol=1e-4, atol=1e-6)
    if k == 1:
        assert float(loss) > 0.01  # the tail bucket keeps k = 1 from being a zero loss


def test_sampled_surrogate_weights_and_metrics_match_numpy():
    rng = np.random.RandomState(1)
    slp = -rng.uniform(0.1, 3, size=(2, 4)).astype(np.float32)
    tlp = -rng.uniform(0.1, 3, size=(2, 4)).astype(np.float32)
    old = slp + rng.normal(scale=0.3, size=(2, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.int32)
    r = np.exp(tlp - slp)
    n = mask.sum()
    # forward KL: stop_grad weight r log r, OPD+ weight -r; grad wrt log pi = weight / n
    for est, w in [("stop_grad", r * np.log(r)), ("opd_plus", -r)]:
        g = jax.grad(lambda s: L.sampled_surrogate(s, tlp, mask, "forward_kl", estimator=est)[0])(jnp.asarray(slp))
        np.testing.assert_allclose(g, w * mask / n, rtol=1e-5, atol=1e-7)
    # sequence level reverse KL, OPD+: g(r_t) + sum_{s>t} f(r_s), f = -log r, g = 1 - log r
    f = -np.log(r) * mask
    w = np.stack([(1 - np.log(r[b])) + np.array([f[b, t + 1:].sum() for t in range(4)]) for b in range(2)])
    g = jax.grad(lambda s: L.sampled_surrogate(s, tlp, mask, "reverse_kl", level="sequence")[0])(jnp.asarray(slp))
    np.testing.assert_allclose(g, w * mask / n, rtol=1e-5, atol=1e-6)
    # with sampler log-probs: PPO ratio and the mismatch metrics
    loss, m = L.sampled_surrogate(slp, tlp, mask, "reverse_kl", sampler_logprobs=old, clip_eps=0.2)
    rho = np.exp(slp - old)
    wr = 1 - np.log(r)
    ref = np.maximum(wr * rho, wr * np.clip(rho, 0.8, 1.2))
    np.testing.assert_allclose(loss, (ref * mask).sum() / n, rtol=1e-5)
    np.testing.assert_allclose(m["logprob_mismatch"], (np.abs(slp - old) * mask).sum() / n, rtol=1e-5)
    np.testing.assert_allclose(m["sampler_kl"], ((old - slp) * mask).sum() / n, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["clip_fraction"], ((np.abs(rho - 1) > 0.2) * mask).sum() / n, rtol=1e-6)
    np.testing.assert_allclose(m["divergence"], (-np.log(r) * mask).sum() / n, rtol=1e-5)


def test_group_advantages_and_rl_opd_match_numpy():
    rewards = np.array([1, 0, 0, 1, 1, 1, 0, 1], np.float32)
    adv = np.asarray(L.group_advantages(rewards, 4))
    g = rewards.reshape(2, 4)
    np.testing.assert_allclose(adv, ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)).ravel(),
                               rtol=1e-5)
    rng = np.random.RandomState(2)
    slp = -rng.uniform(0.1, 2, size=(8, 3)).astype(np.float32)
    tlp = -rng.uniform(0.1, 2, size=(8, 3)).astype(np.float32)
    mask = np.ones((8, 3), np.int32)
    mask[0, 2] = 0
    n = mask.sum()
    for alpha in (0.0, 0.3, 1.0):
        grad = jax.grad(lambda s: L.rl_opd_surrogate(s, tlp, rewards, mask, group_size=4, alpha=alpha)[0])(
            jnp.asarray(slp))
        a_opd = -(1 - (tlp - slp))  # reverse KL OPD+ weight is 1 - log r; advantage is its negative
        a = (1 - alpha) * adv[:, None] + alpha * a_opd
        np.testing.assert_allclose(grad, -a * mask / n, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda s: L.rl_opd_surrogate(s, tlp, rewards, mask, group_size=4, mode="replace")[0])(
        jnp.asarray(slp))
    np.testing.assert_allclose(grad, (1 - (tlp - slp)) * mask / n, rtol=1e-5, atol=1e-6)
    with pytest.raises(OpdError, match="multiple of group size"):
        L.group_advantages(rewards[:7], 4)


def test_gkd_mixes_on_and_off_policy():
    on = L.full_vocab_loss(S_LOGITS, T_LOGITS, MASK, "jsd")
    off = L.full_vocab_loss(T_LOGITS * 0.5, T_LOGITS, MASK, "jsd")
    for lam in (0.0, 0.25, 1.0):
        loss, m = L.gkd_loss(on, off, lam)
        np.testing.assert_allclose(loss, lam * on[0] + (1 - lam) * off[0], rtol=1e-6)
        assert "on_policy/divergence" in m and "off_policy/top1_agreement" in m
    with pytest.raises(OpdError, match="lambda"):
        L.gkd_loss(on, off, 1.5)
