"""Reference maths the tests check the package against, written from the definitions (not from
opd_jax's code): the divergences over a distribution's last axis, and left-padded random prompts."""

import numpy as np


def divergence(p, q, kind, beta=0.5, alpha=0.5, xp=np):
    """D(p = student, q = teacher) per row over the last axis, from probabilities. xp: numpy, or
    jax.numpy to differentiate through p.
        forward_kl  sum q log(q / p)            reverse_kl  sum p log(p / q)
        jsd         beta KL(q || m) + (1 - beta) KL(p || m),  m = beta q + (1 - beta) p
        tv          1/2 sum |q - p|             hellinger   sum (sqrt q - sqrt p)^2
        alpha       (sum q^alpha p^(1 - alpha) - 1) / (alpha (alpha - 1))
        proximal_kl KL(p || beta q + (1 - beta) p)"""
    kl = lambda a, b: xp.sum(a * xp.log(a / b), -1)  # noqa: E731
    if kind == "forward_kl":
        return kl(q, p)
    if kind == "reverse_kl":
        return kl(p, q)
    if kind == "jsd":
        m = beta * q + (1 - beta) * p
        return beta * kl(q, m) + (1 - beta) * kl(p, m)
    if kind == "tv":
        return 0.5 * xp.sum(xp.abs(q - p), -1)
    if kind == "hellinger":
        return xp.sum((xp.sqrt(q) - xp.sqrt(p)) ** 2, -1)
    if kind == "alpha":
        return (xp.sum(q ** alpha * p ** (1 - alpha), -1) - 1) / (alpha * (alpha - 1))
    if kind == "proximal_kl":
        return kl(p, beta * q + (1 - beta) * p)
    raise ValueError(kind)


def left_padded_prompts(seed=0, b=8, p=7, vocab=64, min_real=1):
    """b random prompts of p slots (ids from 3 up), left-padded with 0: row r keeps between min_real and
    p real tokens. -> (ids, mask) numpy [b, p]."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, (b, p))
    mask = np.ones_like(ids)
    for row in range(b):
        mask[row, : rng.randint(0, p - min_real + 1)] = 0
    return np.where(mask == 1, ids, 0), mask
