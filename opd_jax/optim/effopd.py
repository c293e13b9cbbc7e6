"""EffOPD: extrapolate along the recent update direction, with an adaptive step, as an optax transform.

OPD's update direction settles early (paper 001), so every `window` steps we jump ahead along it:

    d_k    = sum of the inner optimizer's updates over window k             (a pytree like params)
    c_k    = cos(d_k, d_{k-1}) = <d_k, d_{k-1}> / (|d_k| |d_{k-1}|)           (over all leaves)
    alpha_k = alpha_max * clip((c_k - min_cos) / (1 - min_cos), 0, 1)         (0 for the first window)
    at the last step of window k the emitted update is  u_t + alpha_k * d_k

so consecutive windows that agree (c -> 1) earn a jump of up to `alpha_max` windows' worth of
motion, and windows that disagree (c <= min_cos) earn none. Knobs: `window` (K), `alpha_max`,
`min_cos`. All state is optax state (arrays only): it jits, shards like the parameters, checkpoints
and resumes with the rest, and composes with `optax.chain`, schedules and masks. A trainer-level
safeguard can compare a probe loss before/after each jump (`jumped(state)` says when one happened).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class EffOPDState(NamedTuple):
    inner: optax.OptState
    count: jax.Array  # steps taken in the current window
    window_sum: optax.Updates  # d_k so far
    prev_dir: optax.Updates  # d_{k-1}
    has_prev: jax.Array  # bool: a previous window exists
    alpha: jax.Array  # alpha of the last completed window
    cosine: jax.Array  # c of the last completed window


def _dot(a, b):
    return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)).real
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def effopd(inner: optax.GradientTransformation, *, window: int = 8, alpha_max: float = 2.0,
           min_cos: float = 0.0, fixed_alpha: float | None = None) -> optax.GradientTransformation:
    """Wrap `inner` (any optax optimizer) with windowed extrapolation; see the module docstring.
    fixed_alpha: jump exactly fixed_alpha * d_k at the end of every window, the first included, whatever
    the cosine (the trainer's line search then rescales the jump on a probe batch)."""
    if window < 1 or alpha_max < 0 or not -1.0 <= min_cos < 1.0:
        raise ValueError(f"effopd needs window >= 1, alpha_max >= 0, -1 <= min_cos < 1; got {window}, {alpha_max}, "
                         f"{min_cos}")

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return EffOPDState(inner.init(params), jnp.int32(0), zeros, jax.tree.map(jnp.zeros_like, params),
                           jnp.bool_(False), jnp.float32(0), jnp.float32(0))

    def update(updates, state, params=None):
        u, inner_state = inner.update(updates, state.inner, params)
        acc = jax.tree.map(lambda s, x: s + x, state.window_sum, u)
        count = state.count + 1
        end = count >= window
        norm = jnp.sqrt(_dot(acc, acc) * _dot(state.prev_dir, state.prev_dir))
        cos = jnp.where(norm > 0, _dot(acc, state.prev_dir) / jnp.where(norm > 0, norm, 1.0), 0.0)
        alpha = alpha_max * jnp.clip((cos - min_cos) / (1.0 - min_cos), 0.0, 1.0)
        if fixed_alpha is None:
            alpha = jnp.where(end & state.has_prev, alpha, 0.0).astype(jnp.float32)
        else:
            alpha = jnp.where(end, fixed_alpha, 0.0).astype(jnp.float32)
        out = jax.tree.map(lambda x, d: x + (alpha * d).astype(x.dtype), u, acc)
        new = EffOPDState(
            inner=inner_state,
            count=jnp.where(end, 0, count).astype(jnp.int32),
            window_sum=jax.tree.map(lambda a: jnp.where(end, jnp.zeros_like(a), a), acc),
            prev_dir=jax.tree.map(lambda a, p: jnp.where(end, a, p), acc, state.prev_dir),
            has_prev=state.has_prev | end,
            alpha=jnp.where(end, alpha, state.alpha),
            cosine=jnp.where(end, cos, state.cosine).astype(jnp.float32),
        )
        return out, new

    return optax.GradientTransformation(init, update)


def jumped(state: EffOPDState) -> jax.Array:
    """True right after an update that included an extrapolation (alpha > 0)."""
    return (state.count == 0) & (state.alpha > 0)


def find_state(opt_state) -> EffOPDState | None:
    """The EffOPDState inside a (possibly chained / masked / multi-step) optimizer state, or None."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EffOPDState))
             if isinstance(s, EffOPDState)]
    return found[0] if found else None


def undo_jump(params, state: EffOPDState, mask=None):
    """params - alpha * d_k (times `mask` where the optimizer was masked): the parameters the last
    update would have produced without its extrapolation. Leaves the optimizer has no state for
    (frozen by a mask) are returned unchanged."""
    masked_node = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    delta = jax.tree.map(lambda d, p: jnp.zeros_like(p) if masked_node(d) else state.alpha * d.astype(jnp.float32),
                         state.prev_dir, params, is_leaf=masked_node)
    if mask is not None:
        delta = jax.tree.map(lambda d, m: d * m.astype(d.dtype), delta, mask)
    return jax.tree.map(lambda p, d: (p.astype(jnp.float32) - d).astype(p.dtype), params, delta)
