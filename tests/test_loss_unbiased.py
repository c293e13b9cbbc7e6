"""Which sampled-token estimators are unbiased: exact gradients by enumeration vs Monte Carlo means.

A tabular autoregressive student over V = 4 tokens and length 3: one row of logits per prefix
(1 + 4 + 16 = 21 rows). The teacher is another table. Exact gradients come from enumerating every
context (token level) or every sequence (sequence level) with divergences written out here,
independently of the library; the estimators' gradients are averaged over 120k sampled sequences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses as L
from references import divergence as ref_divergence

jax.config.update("jax_enable_x64", False)
V, LEN, N = 4, 3, 120_000
ROWS = 1 + V + V * V
OFFSET = [0, 1, 1 + V]


def _tables(seed=0):
    rng = np.random.RandomState(seed)
    return (jnp.asarray(rng.normal(size=(ROWS, V)) * 1.2, jnp.float32),
            jnp.asarray(rng.normal(size=(ROWS, V)) * 1.2, jnp.float32))


def _context_rows(prefix_tokens):
    """Row of each position's context; prefix_tokens [N, LEN] -> [N, LEN]."""
    rows = [np.zeros(len(prefix_tokens), np.int64)]
    code = np.zeros(len(prefix_tokens), np.int64)
    for t in range(1, LEN):
        code = code * V + prefix_tokens[:, t - 1]
        rows.append(OFFSET[t] + code)
    return np.stack(rows, 1)


def _sample(theta, n, seed):
    """Sequences from the student table by inverse CDF (numpy), with their context rows."""
    probs = np.asarray(jax.nn.softmax(theta, -1), np.float64)
    rng = np.random.RandomState(seed)
    toks = np.zeros((n, LEN), np.int64)
    rows = np.zeros((n, LEN), np.int64)
    code = np.zeros(n, np.int64)
    for t in range(LEN):
        rows[:, t] = OFFSET[t] + code if t else 0
        cdf = np.cumsum(probs[rows[:, t]], -1)
        toks[:, t] = np.minimum((rng.uniform(size=(n, 1)) > cdf).sum(-1), V - 1)
        code = code * V + toks[:, t]
    return toks, rows


def _all_sequences():
    grids = np.stack(np.meshgrid(*[np.arange(V)] * LEN, indexing="ij"), -1).reshape(-1, LEN)
    return grids, _context_rows(grids)


def exact_token_level_grad(theta, teacher, kind, **kw):
    """grad of (1/LEN) sum_t E_{c_t ~ sg(pi)} D_f(q(.|c_t) || pi(.|c_t)) by enumerating contexts."""
    seqs, rows = _all_sequences()
    p_sg = np.asarray(jax.nn.softmax(theta, -1), np.float64)
    # probability of reaching each context row (every row is the context of exactly one prefix)
    reach = np.zeros(ROWS)
    for s, r in zip(seqs, rows):
        pr = 1.0
        for t in range(LEN):
            reach[r[t]] = pr
            pr *= p_sg[r[t], s[t]]
    reach = jnp.asarray(reach, jnp.float32)

    def objective(th):
        return jnp.sum(reach * ref_divergence(jax.nn.softmax(th, -1), jax.nn.softmax(teacher, -1), kind, xp=jnp, **kw)) / LEN

    return np.asarray(jax.grad(objective)(theta), np.float64)


# f of the log-ratio r = log q - log pi, with D(q || pi) = E_pi[f(r)]: reverse KL(pi || q) = E_pi[-r];
# forward KL(q || pi) = E_pi[(q / pi) log(q / pi)] = E_pi[r e^r]
F_OF_LOG_RATIO = {"reverse_kl": lambda r: -r, "forward_kl": lambda r: r * jnp.exp(r)}


def exact_sequence_level_grad(theta, teacher, kind, **kw):
    """grad of (1/LEN) E_{y ~ pi}[ sum_t f(r_t) ] by enumerating all V^LEN sequences (differentiating
    through both the sequence probability and r_t). For reverse KL this is KL(pi(y) || q(y)) / LEN."""
    seqs, rows = _all_sequences()
    f = F_OF_LOG_RATIO[kind]  # written here from the definitions, not the code's fdiv table

    def objective(th):
        lp = jax.nn.log_softmax(th, -1)[rows, seqs]
        lq = jax.nn.log_softmax(teacher, -1)[rows, seqs]
        return jnp.sum(jnp.exp(lp.sum(-1)) * f(lq - lp).sum(-1)) / LEN

    if kind == "reverse_kl":  # cross-check against the closed-form sequence KL
        def seq_kl(th):
            lp = jax.nn.log_softmax(th, -1)[rows, seqs].sum(-1)
            lq = jax.nn.log_softmax(teacher, -1)[rows, seqs].sum(-1)
            return jnp.sum(jnp.exp(lp) * (lp - lq)) / LEN
        np.testing.assert_allclose(jax.grad(seq_kl)(theta), jax.grad(objective)(theta), atol=1e-6)
    return np.asarray(jax.grad(objective)(theta), np.float64)


def mc_grads(theta, teacher, kind, estimator, level, rows_per_batch=1, **kw):
    """Mean and standard error of the surrogate gradients of independent batches of sequences."""
    toks, rows = _sample(theta, N, seed=1)
    lq_all = jax.nn.log_softmax(teacher, -1)
    mask = jnp.ones((rows_per_batch, LEN), jnp.int32)

    def one(r, y):
        def surrogate(th):
            slp = jax.nn.log_softmax(th, -1)[r, y]
            tlp = lq_all[r, y]
            return L.sampled_surrogate(slp, tlp, mask, kind, estimator=estimator, level=level, **kw)[0]
        return jax.grad(surrogate)(theta)

    n = N // rows_per_batch
    rows = rows[: n * rows_per_batch].reshape(n, rows_per_batch, LEN)
    toks = toks[: n * rows_per_batch].reshape(n, rows_per_batch, LEN)
    grads = []
    per = jax.jit(jax.vmap(one))
    for i in range(0, n, 20_000):
        grads.append(np.asarray(per(jnp.asarray(rows[i:i + 20_000]), jnp.asarray(toks[i:i + 20_000])), np.float64))
    g = np.concatenate(grads)
    return g.mean(0), g.std(0) / np.sqrt(n)


def z_scores(theta, teacher, kind, estimator, level="token", rows_per_batch=1, **kw):
    div_kw = {k: v for k, v in kw.items() if k in ("beta", "alpha")}
    exact = (exact_token_level_grad if level == "token" else exact_sequence_level_grad)(theta, teacher, kind, **div_kw)
    mean, se = mc_grads(theta, teacher, kind, estimator, level, rows_per_batch=rows_per_batch, **kw)
    assert np.abs(exact).max() > 1e-3
    return np.abs(mean - exact) / (se + 1e-9)


THETA, TEACHER = _tables()
ALL_F = [("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.2}), ("tv", {}),
         ("hellinger", {}), ("alpha", {"alpha": 0.5}), ("alpha", {"alpha": 2.0}), ("proximal_kl", {"beta": 0.3})]


@pytest.mark.slow
@pytest.mark.parametrize("kind,kw", ALL_F)
def test_opd_plus_is_unbiased_for_every_f(kind, kw):
    assert z_scores(THETA, TEACHER, kind, "opd_plus", **kw).max() < 4.0


@pytest.mark.slow
def test_stop_grad_is_unbiased_for_reverse_kl_only():
    assert z_scores(THETA, TEACHER, "reverse_kl", "stop_grad").max() < 4.0
    assert z_scores(THETA, TEACHER, "forward_kl", "stop_grad").max() > 6.0
    assert z_scores(THETA, TEACHER, "jsd", "stop_grad", beta=0.5).max() > 6.0


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["opd_plus", "stop_grad"])
def test_sequence_level_matches_the_sequence_reverse_kl(estimator):
    assert z_scores(THETA, TEACHER, "reverse_kl", estimator, level="sequence").max() < 4.0


@pytest.mark.slow
def test_sequence_level_opd_plus_for_forward_kl_and_token_level_is_not_sequence_level():
    assert z_scores(THETA, TEACHER, "forward_kl", "opd_plus", level="sequence").max() < 4.0
    # the token-level estimator ignores how theta moves the contexts: it misses the sequence gradient
    exact = exact_sequence_level_grad(THETA, TEACHER, "reverse_kl")
    mean, se = mc_grads(THETA, TEACHER, "reverse_kl", "opd_plus", "token")
    assert (np.abs(mean - exact) / (se + 1e-9)).max() > 6.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
def test_leave_one_sequence_out_baseline_keeps_opd_plus_unbiased_and_cuts_variance(kind):
    assert z_scores(THETA, TEACHER, kind, "opd_plus", rows_per_batch=4, baseline="loo").max() < 4.0
    if kind == "reverse_kl":  # the "+1" of reverse KL's weight is pure noise; the baseline removes it
        _, se_plain = mc_grads(THETA, TEACHER, kind, "opd_plus", "token", rows_per_batch=4)
        _, se_loo = mc_grads(THETA, TEACHER, kind, "opd_plus", "token", rows_per_batch=4, baseline="loo")
        assert se_loo.mean() < 0.9 * se_plain.mean()  # measured: about 0.81
