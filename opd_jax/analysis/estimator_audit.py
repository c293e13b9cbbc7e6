"""An audit of OPD estimators: each one's expected gradient against the exact gradient of what it claims
to estimate, its variance, and its values' sign and finiteness, in float32 and bfloat16.

Setting: n independent contexts, each a student logit row s [V] (the parameters) and a teacher row t
[V]. Two regimes: "far" (independent rows, scale 2) and "near" (t = s + 0.05 noise, a student close to
its teacher, late in training). For an estimator with per-sample surrogate l(s, t, y), y ~ pi = softmax(s):

    E[g]    = sum_y pi(y) grad_s l(s, t, y)              (exact: the sampled token is enumerated)
    Var[g]  = sum_y pi(y) (grad_s l(s, t, y) - E[g])^2  per coordinate
    exact   = grad_s D(s, t), D the objective the estimator claims (float32)

    relative bias = |E[g] - exact| / |exact|      (norms over every context and coordinate)
    cosine        = <E[g], exact> / (|E[g]| |exact|);  norm ratio = |E[g]| / |exact|
    z             = max over coordinates of |E[g] - exact| / SE,  SE = sqrt(Var[g] / 1000)
                    (the bias in standard errors of a 1,000-token estimate per context; "-" for a
                    deterministic estimator, whose bias is its relative bias)

A deterministic estimator (a full- or top-k-vocabulary loss) has l independent of y. Values: the
per-context loss the estimator reports (its expectation over y for a sampled one); "negative" counts
contexts below -1e-6, "NaN" non-finite values or gradients. bfloat16 means the logits enter as
bfloat16 (what a bfloat16 model emits); each estimator then computes as its code does.

The peers' rows are their formulas as their issue threads describe them, written here in a few lines
each (our own code): miles #2362, verl #7856, ms-swift #10156 and #10078, TRL #5731.

    python scripts/estimator_audit.py      # prints the table in docs/math.md
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import losses as L

V, K, N_TOKENS = 16, 4, 1000


class Entry(NamedTuple):
    name: str
    source: str  # "ours" or the peer's issue
    claims: str  # the objective D whose gradient it should give
    sampled: bool
    loss: Callable  # (s [V], t [V], y int) -> scalar surrogate (y ignored when not sampled)
    value: Callable  # (s, t, y) -> the per-context value the estimator reports
    target: Callable  # (s, t) -> D, float32


def contexts(n: int = 64, regime: str = "far", seed: int = 0):
    """Student and teacher logit rows [n, V] (float32)."""
    rng = np.random.RandomState(seed)
    s = rng.normal(size=(n, V)) * 2.0
    t = rng.normal(size=(n, V)) * 2.0 if regime == "far" else s + rng.normal(size=(n, V)) * 0.05
    return jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)


# ------------------------------------------------------------------ exact objectives (float32), written here
# from the definitions, not through opd_jax.losses (so a library bug cannot hide in both sides)
def _lp(x):
    x = x.astype(jnp.float32)
    return x - jnp.log(jnp.sum(jnp.exp(x - jnp.max(x)))) - jnp.max(x)


def rkl(s, t):
    lp, lq = _lp(s), jax.lax.stop_gradient(_lp(t))
    return jnp.sum(jnp.exp(lp) * (lp - lq))


def fkl(s, t):
    lp, lq = _lp(s), jax.lax.stop_gradient(_lp(t))
    return jnp.sum(jnp.exp(lq) * (lq - lp))


def jsd(beta):
    def d(s, t):
        p, q = jnp.exp(_lp(s)), jax.lax.stop_gradient(jnp.exp(_lp(t)))
        m = beta * q + (1 - beta) * p
        return beta * jnp.sum(q * jnp.log(q / m)) + (1 - beta) * jnp.sum(p * jnp.log(p / m))
    return d


def proximal(beta):
    def d(s, t):
        p, q = jnp.exp(_lp(s)), jax.lax.stop_gradient(jnp.exp(_lp(t)))
        return jnp.sum(p * jnp.log(p / (beta * q + (1 - beta) * p)))
    return d


def bucketed(kind, ids_from):
    """KL over the K + 1 buckets (the top-K ids of `ids_from`, "teacher" or "student", and the rest), the
    ids held fixed; kind reverse_kl = KL(p_b || q_b), forward_kl = KL(q_b || p_b)."""
    def d(s, t):
        p, q = jnp.exp(_lp(s)), jax.lax.stop_gradient(jnp.exp(_lp(t)))
        top = jnp.argsort(-jax.lax.stop_gradient(q if ids_from == "teacher" else p))[:K]
        pb = jnp.concatenate([p[top], 1 - jnp.sum(p[top], keepdims=True)])
        qb = jnp.concatenate([q[top], 1 - jnp.sum(q[top], keepdims=True)])
        a, b = (pb, qb) if kind == "reverse_kl" else (qb, pb)
        return jnp.sum(a * jnp.log(a / b))
    return d


def proximal_frozen(beta):
    """KL(pi || sg(M)), M = beta q + (1 - beta) pi with pi inside M held fixed: what TOP-D's reward optimises."""
    def d(s, t):
        p, q = jnp.exp(_lp(s)), jax.lax.stop_gradient(jnp.exp(_lp(t)))
        return jnp.sum(p * jnp.log(p / jax.lax.stop_gradient(beta * q + (1 - beta) * p)))
    return d


# ------------------------------------------------------------------ the peers' formulas
def miles_topk_penalty(s, t, y):
    """miles #2362: reverse KL over the student's top-k candidates, sum_i w_i (log p_i - log q_i) with w the
    student's probabilities renormalised over the candidates, detached and subtracted from the advantage:
    the surrogate is A * log pi(y) with A that constant. Its expected gradient is A E[grad log pi] = 0."""
    lp, lq = _lp(s), _lp(t)
    top = jax.lax.top_k(lp, K)[1]
    lps, lqs = jnp.take_along_axis(lp, top, -1), jnp.take_along_axis(lq, top, -1)
    a = jax.lax.stop_gradient(jnp.sum(jax.nn.softmax(lps) * (lps - lqs)))
    return a * lp[y]


def miles_value(s, t, y):
    lp, lq = _lp(s), _lp(t)
    top = jax.lax.top_k(lp, K)[1]
    lps, lqs = jnp.take_along_axis(lp, top, -1), jnp.take_along_axis(lq, top, -1)
    return jnp.sum(jax.nn.softmax(lps) * (lps - lqs))


def verl_topk_fkl_clamped(s, t, y):
    """verl #7856: the teacher's top-k terms of forward KL, sum_{i in T} q_i (log q_i - log p_i), clamped at 0."""
    lp, lq = _lp(s), _lp(t)
    lqs, top = jax.lax.top_k(lq, K)
    return jnp.maximum(jnp.sum(jnp.exp(lqs) * (lqs - jnp.take_along_axis(lp, top, -1))), 0.0)


def swift_jsd_low_precision(s, t, y, beta=0.5):
    """ms-swift #10156: JSD(beta) with the teacher's probabilities formed in the teacher logits' precision
    (bfloat16 in the report) and combined with the float32 student's: M = beta q + (1 - beta) p, then
    beta KL(q || M) + (1 - beta) KL(p || M) summed directly."""
    q = jax.nn.softmax(t)  # in t's dtype: rounded when t is bfloat16
    lq = jnp.log(q).astype(jnp.float32)
    q = q.astype(jnp.float32)
    lp = _lp(s)
    p = jnp.exp(lp)
    lm = jnp.log(beta * q + (1 - beta) * p)
    return beta * jnp.sum(q * (lq - lm)) + (1 - beta) * jnp.sum(p * (lp - lm))


def trl_fused_gkd(s, t, y, beta=0.5, temperature=0.9):
    """TRL #5731: the fused path computed 0.5 CE(labels) + 0.5 JSD(beta), both at the sampling temperature
    0.9, where the plain path is JSD(beta) at temperature 1; on-policy, the labels are the student's sample y."""
    lp = jax.nn.log_softmax(s.astype(jnp.float32) / temperature)
    return 0.5 * -lp[y] + 0.5 * L.divergence(s, t, "jsd", beta=beta, temperature=temperature)


def swift_beta_jsd(beta):
    """ms-swift #10078: for 0 < beta < 1, beta KL(q || M) + (1 - beta) KL(p || M), M = beta q + (1 - beta) p,
    documented as tending to forward KL as beta -> 0: it tends to 0 (about beta KL(q || p))."""
    def loss(s, t, y):
        lp, lq = _lp(s), _lp(t)
        lm = jnp.logaddexp(jnp.log(beta) + lq, jnp.log1p(-beta) + lp)
        return beta * jnp.sum(jnp.exp(lq) * (lq - lm)) + (1 - beta) * jnp.sum(jnp.exp(lp) * (lp - lm))
    return loss


# ------------------------------------------------------------------ ours, through the library
def _ours_full(kind, **kw):
    return lambda s, t, y: L.divergence(s, t, kind, **kw)


def _ours_sampled(kind, estimator, **kw):
    def loss(s, t, y):
        lp, lq = _lp(s), _lp(t)
        return L.sampled_surrogate(lp[y][None, None], lq[y][None, None], jnp.ones((1, 1), jnp.int32), kind,
                                   estimator=estimator, **kw)[0]

    def value(s, t, y):  # the reported per-token divergence term f(r)
        lp, lq = _lp(s), _lp(t)
        return L.get_fdiv(kind, **kw).f(lq[y] - lp[y])
    return loss, value


def _ours_topk(kind, top_from):
    def loss(s, t, y):  # hidden = the logits, output matrix = identity: the chunked path's own code
        eye = jnp.eye(V, dtype=s.dtype)
        return L.chunked_topk_loss(s[None, None], eye, t[None, None], eye.astype(t.dtype), jnp.ones((1, 1), jnp.int32),
                                   K, kind, top_from=top_from)[0]
    return loss


def _e(name, source, claims, loss, target, sampled=False, value=None):
    return Entry(name, source, claims, sampled, loss, value or loss, target)


def entries() -> list[Entry]:
    rs_loss, rs_val = _ours_sampled("reverse_kl", "opd_plus")
    rsg_loss, rsg_val = _ours_sampled("reverse_kl", "stop_grad")
    fs_loss, fs_val = _ours_sampled("forward_kl", "opd_plus")
    fsg_loss, fsg_val = _ours_sampled("forward_kl", "stop_grad")
    px_loss, px_val = _ours_sampled("proximal_kl", "opd_plus", beta=0.5)
    pxs_loss, pxs_val = _ours_sampled("proximal_kl", "stop_grad", beta=0.5)
    prox = proximal(0.5)
    return [
        _e("top-k reverse KL as a detached advantage penalty", "miles #2362", "KL(pi||q)", miles_topk_penalty, rkl,
           sampled=True, value=miles_value),
        _e("teacher top-k forward KL terms, clamp_min(0)", "verl #7856", "KL(q||pi)", verl_topk_fkl_clamped, fkl),
        _e("JSD(0.5), teacher probabilities in the logits' precision", "ms-swift #10156", "JSD(0.5)",
           swift_jsd_low_precision, jsd(0.5)),
        _e("0.5 CE(sample) + 0.5 JSD(0.5), both at T = 0.9", "TRL #5731", "JSD(0.5) at T = 1", trl_fused_gkd,
           jsd(0.5), sampled=True),
        _e("JSD(beta = 0.05) read as forward KL", "ms-swift #10078", "KL(q||pi)", swift_beta_jsd(0.05), fkl),
        _e("exact reverse KL (full)", "ours", "KL(pi||q)", _ours_full("reverse_kl"), rkl),
        _e("exact forward KL (full)", "ours", "KL(q||pi)", _ours_full("forward_kl"), fkl),
        _e("exact JSD(0.5) (full)", "ours", "JSD(0.5)", _ours_full("jsd", beta=0.5), jsd(0.5)),
        _e("jsd(beta = 0.05) (full; documented: tends to 0, beta = 0 is forward KL)", "ours", "KL(q||pi)",
           _ours_full("jsd", beta=0.05), fkl),
        _e("teacher top-k + tail, forward KL (topk)", "ours", "KL over the k+1 buckets",
           _ours_topk("forward_kl", "teacher"), bucketed("forward_kl", "teacher")),
        _e("teacher top-k + tail, forward KL (topk), against the full KL", "ours", "KL(q||pi)",
           _ours_topk("forward_kl", "teacher"), fkl),
        _e("student top-k + tail, reverse KL (topk_from: student)", "ours (new)", "KL over the k+1 buckets",
           _ours_topk("reverse_kl", "student"), bucketed("reverse_kl", "student")),
        _e("student top-k + tail, reverse KL, against the full KL", "ours (new)", "KL(pi||q)",
           _ours_topk("reverse_kl", "student"), rkl),
        _e("sampled reverse KL, OPD+", "ours", "KL(pi||q)", rs_loss, rkl, sampled=True, value=rs_val),
        _e("sampled reverse KL, stop-gradient", "ours", "KL(pi||q)", rsg_loss, rkl, sampled=True, value=rsg_val),
        _e("sampled forward KL, OPD+", "ours", "KL(q||pi)", fs_loss, fkl, sampled=True, value=fs_val),
        _e("sampled forward KL, stop-gradient (documented biased)", "ours", "KL(q||pi)", fsg_loss, fkl, sampled=True,
           value=fsg_val),
        _e("sampled proximal KL(0.5), OPD+", "ours (new)", "KL(pi||M)", px_loss, prox, sampled=True, value=px_val),
        _e("sampled proximal KL(0.5), stop-gradient = TOP-D's log(a rho + 1 - a)", "ours (new)", "KL(pi||sg(M))",
           pxs_loss, proximal_frozen(0.5), sampled=True, value=pxs_val),
        _e("the same, against the full proximal KL", "ours (new)", "KL(pi||M)", pxs_loss, prox, sampled=True,
           value=pxs_val),
    ]


def audit(entry: Entry, dtype=jnp.float32, regime: str = "far", n: int = 64, seed: int = 0) -> dict:
    """The entry's row: relative bias, cosine, z (sampled only), negatives, NaNs, clamp-at-zero share."""
    s, t = contexts(n, regime, seed)
    ys = jnp.arange(V)

    def grads_one(si, ti):  # per sampled token: [V (token), V (coordinate)]
        g = jax.vmap(lambda y: jax.grad(lambda x: entry.loss(x.astype(dtype), ti.astype(dtype), y)
                                        .astype(jnp.float32))(si))(ys)
        vals = jax.vmap(lambda y: entry.value(si.astype(dtype), ti.astype(dtype), y).astype(jnp.float32))(ys)
        return g, vals

    g, vals = jax.jit(jax.vmap(grads_one))(s, t)  # [n, V, V], [n, V]
    p = np.asarray(jax.nn.softmax(s, -1), np.float64)
    g, vals = np.asarray(g, np.float64), np.asarray(vals, np.float64)
    if entry.sampled:
        mean = np.einsum("ny,nyv->nv", p, g)
        var = np.einsum("ny,nyv->nv", p, (g - mean[:, None]) ** 2)
        value = np.einsum("ny,ny->n", p, vals)
    else:
        mean, var, value = g[:, 0], np.zeros_like(g[:, 0]), vals[:, 0]
    exact = np.asarray(jax.vmap(jax.grad(entry.target))(s, t), np.float64)
    diff = mean - exact
    se = np.sqrt(var / N_TOKENS)
    z = float(np.max(np.abs(diff)[se > 0] / se[se > 0])) if entry.sampled and np.any(se > 0) else None
    norm = np.linalg.norm(exact)
    cos = float(np.sum(mean * exact) / (np.linalg.norm(mean) * norm)) if np.linalg.norm(mean) > 0 else 0.0
    return {"relative_bias": float(np.linalg.norm(diff) / norm), "cosine": cos, "z": z,
            "norm_ratio": float(np.linalg.norm(mean) / norm),
            "negative": int(np.sum(value < -1e-6)), "min_value": float(np.min(value)),
            "nan": int(np.sum(~np.isfinite(value)) + np.sum(~np.all(np.isfinite(g), axis=(1, 2)))),
            "zero_grad": int(np.sum(np.all(mean == 0, -1))), "n": n}


def table(n: int = 64) -> list[dict]:
    """Every entry in float32 and bfloat16, far and near (the rows of docs/math.md's audit table)."""
    rows = []
    for e in entries():
        r = {"name": e.name, "source": e.source, "claims": e.claims}
        for dt_name, dt in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
            for regime in ("far", "near"):
                r[f"{dt_name}_{regime}"] = audit(e, dt, regime, n)
        rows.append(r)
    return rows
