"""Pure building blocks of the decoder: RMSNorm, rotary embeddings, SwiGLU (attention: `attention.py`).

Shapes: B batch, T query length, S key length (cache slots), D model width, H query heads,
K key/value heads (H % K == 0), Dh head width, F MLP width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp



def rms_norm(x, weight, eps):
    """y = w * x / sqrt(mean(x^2) + eps), the statistic in float32, the product in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None):
    """inv_freq[i] = theta^(-2i/Dh), i < Dh/2, with Llama 3's frequency-dependent rescaling.

    Llama 3 (`rope_type: llama3`): wavelengths longer than L/low_freq_factor are divided by
    `factor`, shorter than L/high_freq_factor kept, and those between blended linearly in
    L/wavelength, where L is `original_max_position_embeddings`.
    """
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv
    factor = scaling["factor"]
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = jnp.where(wavelen > old_len / lo, inv / factor, inv)
    medium = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
    return jnp.where(medium, blended, out)


def apply_rope(x, positions, inv_freq):
    """Rotate halves: x [B, T, N, Dh], positions [B, T] int -> same shape, computed in float32."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def swiglu(x, w_gate, w_up, w_down):
    """down(silu(x @ gate) * (x @ up)); x [B, T, D], gate/up [D, F], down [F, D]."""
    g = jax.nn.silu(x @ w_gate)
    return (g * (x @ w_up)) @ w_down


def lora_delta(x, p: dict, name: str, scale: float):
    """A LoRA adapter's term (alpha / r) (x A) B for projection `name` (`opd_jax.lora`): x [..., in...],
    p one layer's weights with A = p[name + "_lora_a"] [in..., r] and B = p[name + "_lora_b"] [r, out...]."""
    a = p[name + "_lora_a"]
    xa = jnp.tensordot(x, a, axes=a.ndim - 1)
    return scale * jnp.tensordot(xa, p[name + "_lora_b"], axes=1)
