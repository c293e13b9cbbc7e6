"""The registry of f-divergences D_f(q || pi) = sum_y pi(y) f(q(y) / pi(y)), f convex, f(1) = 0.

q is the teacher, pi the student. Each entry gives three pure functions:

* `perspective(lp, lq)` = pi * f(q / pi) from log-probabilities, written so that it stays finite
  when either probability underflows (used for the exact, full-vocabulary divergence);
* `f(lr)`  = f(r) with lr = log r = log q(y) - log pi(y) (the per-token sampled term, "-reward");
* `g(lr)`  = f(r) - r f'(r), the OPD+ weight: grad D_f = E_{y~pi}[ g(r) grad log pi(y) ].

| kind        | f(u)                                              | g(r) = f - r f'               |
| ----------- | ------------------------------------------------- | ----------------------------- |
| reverse_kl  | -log u                      (KL(pi || q))         | 1 - log r                     |
| forward_kl  | u log u                     (KL(q || pi))         | -r                            |
| jsd (beta)  | beta u log(u/m) - (1-beta) log m, m = beta u + 1-beta | -(1-beta) log m(r)        |
| tv          | |u - 1| / 2                                       | -sign(r - 1) / 2              |
| hellinger   | (sqrt u - 1)^2                                    | 1 - sqrt r                    |
| alpha (a)   | (u^a - a u - (1-a)) / (a (a-1)),  a not in {0, 1}  | -(r^a - 1) / a                |
| proximal_kl | -log m(u), m = beta u + 1-beta  (KL(pi || M))     | -log m(r) + beta r / m(r)     |

jsd(beta) is GKD's generalized Jensen-Shannon: beta KL(q || M) + (1-beta) KL(pi || M) with
M = beta q + (1-beta) pi. It tends to 0 at both ends, so beta = 0 and beta = 1 are defined as
exactly forward KL and reverse KL (the limits of jsd(beta) / (beta (1-beta)) ).

proximal_kl(beta) is KL(pi || M) with the same M = beta q + (1-beta) pi: the reverse KL to a "proximal
teacher" (TOP-D, arXiv 2607.04751). Its sampled term f = -log(beta r + 1 - beta) >= -log(1 - beta) is
bounded however small q(y) is; beta = 1 is exactly reverse KL. With the stop-gradient estimator, its
reward -f is TOP-D's log(alpha rho + 1 - alpha) (their alpha is this beta, rho = r).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax.numpy as jnp

from opd_jax.errors import OpdError


class FDiv(NamedTuple):
    name: str
    perspective: Callable  # (lp, lq) -> pi f(q/pi)
    f: Callable  # lr -> f(e^lr)
    g: Callable  # lr -> f(r) - r f'(r)


def _reverse_kl():
    return FDiv("reverse_kl", lambda lp, lq: jnp.exp(lp) * (lp - lq), lambda lr: -lr, lambda lr: 1.0 - lr)


def _forward_kl():
    return FDiv("forward_kl", lambda lp, lq: jnp.exp(lq) * (lq - lp), lambda lr: jnp.exp(lr) * lr,
                lambda lr: -jnp.exp(lr))


def _jsd(beta: float):
    lb, l1b = math.log(beta), math.log1p(-beta)

    def perspective(lp, lq):
        lm = jnp.logaddexp(lb + lq, l1b + lp)  # log M
        return beta * jnp.exp(lq) * (lq - lm) + (1 - beta) * jnp.exp(lp) * (lp - lm)

    def log_m(lr):  # log(beta r + 1 - beta)
        return jnp.logaddexp(lb + lr, l1b)

    return FDiv(f"jsd({beta})", perspective,
                lambda lr: beta * jnp.exp(lr) * (lr - log_m(lr)) - (1 - beta) * log_m(lr),
                lambda lr: -(1 - beta) * log_m(lr))


def _tv():
    return FDiv("tv", lambda lp, lq: 0.5 * jnp.abs(jnp.exp(lq) - jnp.exp(lp)),
                lambda lr: 0.5 * jnp.abs(jnp.exp(lr) - 1.0), lambda lr: -0.5 * jnp.sign(lr))


def _hellinger():
    return FDiv("hellinger", lambda lp, lq: (jnp.exp(0.5 * lq) - jnp.exp(0.5 * lp)) ** 2,
                lambda lr: (jnp.exp(0.5 * lr) - 1.0) ** 2, lambda lr: 1.0 - jnp.exp(0.5 * lr))


def _alpha(a: float):
    if a in (0.0, 1.0):
        raise OpdError("alpha-divergence needs alpha not in {0, 1} (use reverse_kl / forward_kl)")
    c = 1.0 / (a * (a - 1.0))
    return FDiv(f"alpha({a})",
                lambda lp, lq: c * (jnp.exp(a * lq + (1 - a) * lp) - a * jnp.exp(lq) - (1 - a) * jnp.exp(lp)),
                lambda lr: c * (jnp.exp(a * lr) - a * jnp.exp(lr) - (1 - a)),
                lambda lr: -(jnp.exp(a * lr) - 1.0) / a)


def _proximal_kl(beta: float):
    lb, l1b = math.log(beta), math.log1p(-beta)

    def log_m(lr):  # log(beta r + 1 - beta)
        return jnp.logaddexp(lb + lr, l1b)

    return FDiv(f"proximal_kl({beta})",
                lambda lp, lq: jnp.exp(lp) * (lp - jnp.logaddexp(lb + lq, l1b + lp)),
                lambda lr: -log_m(lr),
                lambda lr: -log_m(lr) + beta * jnp.exp(lr - log_m(lr)))


KINDS = ("reverse_kl", "forward_kl", "jsd", "tv", "hellinger", "alpha", "proximal_kl")


def get_fdiv(kind: str, *, beta: float = 0.5, alpha: float = 0.5) -> FDiv:
    """The registry entry for `kind` (beta for jsd, alpha for the alpha family)."""
    if kind == "reverse_kl":
        return _reverse_kl()
    if kind == "forward_kl":
        return _forward_kl()
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise OpdError(f"jsd beta must be in [0, 1], got {beta}")
        return _forward_kl() if beta == 0.0 else _reverse_kl() if beta == 1.0 else _jsd(float(beta))
    if kind == "tv":
        return _tv()
    if kind == "hellinger":
        return _hellinger()
    if kind == "alpha":
        return _alpha(float(alpha))
    if kind == "proximal_kl":
        if not 0.0 < beta <= 1.0:
            raise OpdError(f"proximal_kl beta (the teacher's weight in the proximal teacher) must be in (0, 1], "
                           f"got {beta}")
        return _reverse_kl() if beta == 1.0 else _proximal_kl(float(beta))
    raise OpdError(f"unknown divergence kind {kind!r}; choose one of {', '.join(KINDS)}")
