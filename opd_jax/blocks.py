"""Cutting an axis into equal blocks, for the chunked losses and blockwise attention."""

from __future__ import annotations

import jax.numpy as jnp


def pad_axis(x, axis, multiple, value=0.0):
    """Pad `axis` at its end with `value` up to a multiple of `multiple`."""
    extra = (-x.shape[axis]) % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def split_blocks(x, axis, size):
    """[..., n*size, ...] -> [n, ..., size, ...]: the block index leading, the block at `axis` + 1."""
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape((x.shape[0] // size, size) + x.shape[1:])
    return jnp.moveaxis(x, 1, axis + 1)
