"""Sparse-subnetwork training: 0/1 masks over parameters, and an optimizer that moves only masked-in coordinates.

Mask builders (each returns a pytree of bool arrays shaped like the parameters):
* `mask_from_update(delta, fraction, scope)`: keep the top `fraction` of coordinates by |delta|
  (a previous run's W1 - W0), over all parameters ("global") or within each matrix ("per_matrix");
* `mask_from_patterns(params, include)`: whole leaves whose path matches any regex in `include`;
* `mask_from_small_weights(params, fraction)`: the `fraction` of coordinates with the smallest |W0|
  in each leaf (the near-zero coordinates OPD prefers, paper 000).

`masked_optimizer(opt, mask)`: leaves with no trainable coordinate get `optax.set_to_zero()` and
carry no optimizer state; the others run `opt` and their update is multiplied by the mask, so a
frozen coordinate never moves (weight decay included). Masks save / load as safetensors (uint8).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

from opd_jax.errors import OpdError


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _abs_flat(*xs) -> np.ndarray:
    return np.concatenate([np.abs(np.asarray(x, np.float32)).ravel() for x in xs])


def _kth(a: np.ndarray, fraction: float, largest: bool):
    """The value with round(fraction * size) entries of `a` at or beyond it (from the top or bottom)."""
    k = max(int(round(fraction * a.size)), 1)
    return np.partition(a, a.size - k)[a.size - k] if largest else np.partition(a, k - 1)[k - 1]


def mask_from_update(delta, fraction: float, scope: str = "global"):
    """Top-`fraction` coordinates of |delta| (ties at the threshold kept)."""
    if not 0.0 < fraction <= 1.0:
        raise OpdError(f"mask fraction must be in (0, 1], got {fraction}")
    if scope == "global":
        thresh = _kth(_abs_flat(*jax.tree.leaves(delta)), fraction, largest=True)
        return jax.tree.map(lambda x: jnp.abs(x.astype(jnp.float32)) >= thresh, delta)
    if scope == "per_matrix":
        return jax.tree.map(lambda x: jnp.abs(x.astype(jnp.float32)) >= _kth(_abs_flat(x), fraction, True), delta)
    raise OpdError(f"mask scope must be 'global' or 'per_matrix', got {scope!r}")


def mask_from_patterns(params, include: list[str]):
    """True on every coordinate of leaves whose path ('layers/w_up', 'embed', ...) matches a regex."""
    regs = [re.compile(p) for p in include]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full(x.shape, any(r.search(_path_name(path)) for r in regs)), params)


def mask_from_small_weights(params, fraction: float):
    """True on the `fraction` of coordinates with the smallest |W| in each leaf."""
    return jax.tree.map(lambda x: jnp.abs(x.astype(jnp.float32)) <= _kth(_abs_flat(x), fraction, False), params)


def random_mask(params, fraction: float, seed: int = 0):
    """A uniform random mask with the same expected density (the control for a discovered mask)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.uniform(k, x.shape) < fraction for k, x in zip(keys, leaves)])


def mask_density(mask) -> float:
    leaves = jax.tree.leaves(mask)
    return float(sum(np.asarray(m).sum() for m in leaves) / max(sum(m.size for m in leaves), 1))


def masked_optimizer(opt: optax.GradientTransformation, mask) -> optax.GradientTransformation:
    """`opt` on masked-in coordinates only; all-frozen leaves get no optimizer state."""
    labels = jax.tree.map(lambda m: "train" if bool(np.asarray(m).any()) else "frozen", mask)
    keep_masked = optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask), state))
    return optax.chain(optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels), keep_masked)


def save_mask(mask, path: str | Path) -> Path:
    flat = {_path_name(p): np.asarray(m, np.uint8) for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    save_file(flat, str(path))
    return Path(path)


def load_mask(path: str | Path, like):
    """Read a mask saved by `save_mask` into the structure of `like` (names and shapes must match)."""
    path = Path(path)
    if not path.exists():
        raise OpdError(f"mask file does not exist: {path}")
    flat = load_file(str(path))

    def one(p, x):
        name = _path_name(p)
        if name not in flat:
            raise OpdError(f"mask file {path} has no entry for parameter {name!r}")
        if flat[name].shape != x.shape:
            raise OpdError(f"mask for {name!r} has shape {flat[name].shape}, parameter has {x.shape}")
        return jnp.asarray(flat[name].astype(bool))

    return jax.tree_util.tree_map_with_path(one, like)
