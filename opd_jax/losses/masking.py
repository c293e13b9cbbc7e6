"""The one masking / normalisation contract shared by every loss.

`mask` [B, T] is 1 on generated tokens (EOS included) and 0 on prompt and padding. A loss is the
mean of per-token values over real tokens only:

* normalize="token"    : sum_{b,t} m_bt x_bt / max(sum m, 1)      (per-token mean over the batch)
* normalize="sequence" : mean over rows with >= 1 token of ( sum_t m_bt x_bt / sum_t m_bt )

An all-masked batch gives exactly 0, never 0/0. Values at masked positions are replaced by 0
*before* any arithmetic (`clean`), so NaN or inf there cannot leak into the loss or its gradient.
"""

from __future__ import annotations

import jax.numpy as jnp

from opd_jax.errors import OpdError

NORMALIZE = ("token", "sequence")


def clean(x, mask, fill=0.0):
    """x where mask else `fill`, applied to inputs so masked garbage never reaches a gradient."""
    return jnp.where(mask.astype(bool), x, fill)


def masked_mean(x, mask, normalize: str = "token"):
    """Mean of x [B, T] over mask [B, T] under the contract above -> scalar float32."""
    m = mask.astype(jnp.float32)
    x = clean(x, mask).astype(jnp.float32)
    if normalize == "token":
        return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
    if normalize == "sequence":
        per_row = jnp.sum(x * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
        has = (jnp.sum(m, axis=-1) > 0).astype(jnp.float32)
        return jnp.sum(per_row * has) / jnp.maximum(jnp.sum(has), 1.0)
    raise OpdError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")


def token_count(mask):
    return jnp.sum(mask.astype(jnp.float32))
