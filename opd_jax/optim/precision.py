"""Optimizer state in a wider dtype than the parameters (bfloat16 weights, float32 Adam moments)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def with_state_dtype(inner: optax.GradientTransformation, dtype=jnp.float32) -> optax.GradientTransformation:
    """Run `inner` on `dtype` copies of the gradients and parameters, so its state (Adam's m and v,
    momentum, EffOPD's accumulators) lives in `dtype` whatever the parameters' dtype.

      init(params)            = inner.init(cast(params, dtype))
      update(g, state, p)     = inner.update(cast(g, dtype), state, cast(p, dtype))   (updates stay in dtype)

    The updates are returned in `dtype`; `optax.apply_updates` adds them to the parameters in that dtype
    and rounds the sum to the parameter's own dtype, once. With bfloat16 parameters this is how LLM
    post-training runs without float32 master weights: an update below half a bfloat16 step of its
    weight is lost in that rounding, which is where the sparsity of small-learning-rate updates comes
    from (docs/results.md)."""
    dtype = jnp.dtype(dtype)

    def cast(tree):
        return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return inner.init(cast(params))

    def update(updates, state, params=None):
        return inner.update(cast(updates), state, None if params is None else cast(params))

    return optax.GradientTransformation(init, update)
