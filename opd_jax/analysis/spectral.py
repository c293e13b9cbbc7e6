"""Singular values and subspaces of parameter updates, computed on device.

`top_singular(M, k)` is a randomized range finder (Halko, Martinsson & Tropp): Y = (M M^T)^q M G with
a Gaussian G of k + oversample columns, orthonormalise, and take the SVD of the small projected
matrix. Exact for matrices of rank <= k + oversample, and a few power iterations make the top
singular values accurate for the fast-decaying spectra of updates. It is a jitted function of
device arrays, so a sharded matrix never has to come to the host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("k", "oversample", "iters"))
def top_singular(m, key, k: int, oversample: int = 8, iters: int = 4):
    """Top-k singular triplets of a 2-D matrix m [a, b] -> (U [a, k], s [k], Vt [k, b]), float32."""
    m = m.astype(jnp.float32)
    r = min(k + oversample, *m.shape)
    g = jax.random.normal(key, (m.shape[1], r), jnp.float32)
    y = m @ g
    for _ in range(iters):
        y, _ = jnp.linalg.qr(y)
        y = m @ (m.T @ y)
    q, _ = jnp.linalg.qr(y)
    u_small, s, vt = jnp.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ u_small)[:, :k], s[:k], vt[:k]


def singular_values(m, *, k: int | None = None, key=None):
    """All singular values (dense, for small matrices) or the top k (randomized)."""
    if k is None or k >= min(m.shape):
        return jnp.linalg.svd(m.astype(jnp.float32), compute_uv=False)
    return top_singular(m, key if key is not None else jax.random.key(0), k)[1]


def effective_rank(s):
    """exp(entropy of s / sum s): 1 for a rank-1 matrix, n for n equal singular values."""
    p = s / jnp.maximum(jnp.sum(s), 1e-30)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def numerical_rank(s, shape, dtype_eps: float = 1.19e-7):
    """#{sigma_i > sigma_max * max(shape) * eps} (numpy's matrix_rank rule)."""
    return jnp.sum(s > s[0] * max(shape) * dtype_eps) if s.size else jnp.int32(0)


def energy_fraction(s, k: int):
    """sum_{i<=k} sigma_i^2 / sum sigma_i^2."""
    e = s.astype(jnp.float32) ** 2
    return jnp.sum(e[:k]) / jnp.maximum(jnp.sum(e), 1e-30)


def subspace_overlap(u1, u2):
    """||U1^T U2||_F^2 / k for orthonormal columns U1, U2 [n, k]: 1 same span, 0 orthogonal."""
    k = min(u1.shape[1], u2.shape[1])
    return jnp.sum((u1[:, :k].T @ u2[:, :k]) ** 2) / k


def top_left_subspace(m, k: int, key=None, dense_limit: int = 512):
    """(U [a, k], all-or-top singular values) of m: an exact SVD when min(shape) <= dense_limit,
    else the randomized `top_singular` (then only the top k singular values)."""
    m = m.astype(jnp.float32)
    if min(m.shape) <= dense_limit:
        u, s, _ = jnp.linalg.svd(m, full_matrices=False)
        return u[:, :k], s
    u, s, _ = top_singular(m, key if key is not None else jax.random.key(0), k)
    return u, s
