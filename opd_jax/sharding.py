"""Sharding as data: logical axis names on parameters, a rules table to mesh axes.

A mesh has axes ("data", "fsdp", "tensor"). A rules table maps each logical axis name
(`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `layers`, `batch`, ...) to a mesh axis, a tuple
of mesh axes, or None (replicated). A dimension whose size the mesh axes do not divide is
replicated instead of failing, so tiny test models run on any mesh.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. FSDP shards the model width, tensor parallelism the heads / MLP / vocab.
DEFAULT_RULES: dict[str, object] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "layers": None,
    "head_dim": None,
    "norm": None,
    "cache_seq": None,
}

# Pure FSDP (for example for a frozen teacher): only the width is split.
FSDP_RULES: dict[str, object] = {**{k: None for k in DEFAULT_RULES}, "batch": ("data", "fsdp"),
                                 "embed": ("fsdp", "tensor")}


def mesh_sizes(shape: Mapping[str, int] | tuple, n_devices: int) -> dict[str, int]:
    """{data, fsdp, tensor} sizes for `n_devices`, with one -1 resolved to the rest; ValueError if
    they do not multiply to `n_devices`."""
    sizes = [shape[a] for a in MESH_AXES] if isinstance(shape, Mapping) else list(shape)
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {n_devices}")
    return dict(zip(MESH_AXES, sizes))


def make_mesh(shape: Mapping[str, int] | tuple = (1, -1, 1), devices=None) -> Mesh:
    """Mesh over `devices` (default all) with axes data/fsdp/tensor; one size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_sizes(shape, len(devices))
    return Mesh(np.asarray(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def logical_to_spec(axes, shape, mesh: Mesh, rules=None) -> P:
    """PartitionSpec for an array of `shape` whose dims are named `axes`.

    Each mesh axis is used at most once; a dim not divisible by its mesh axes is replicated.
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name, size in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used and mesh.shape.get(n, 1) > 1)
        if names and size % math.prod(mesh.shape[n] for n in names) == 0:
            used.update(names)
            out.append(names[0] if len(names) == 1 else names)
        else:
            out.append(None)
    return P(*out)


def named_sharding(axes, shape, mesh: Mesh, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def layout_fn(mesh: Mesh, rules=None):
    """`layout(x, logical_axes)`: x constrained (inside jit) to the sharding the rules give those axes
    on `mesh`; what `models.transformer.activation_layout` and the losses take."""
    def layout(x, axes):
        return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, mesh, rules))

    layout.mesh = mesh  # for kernels that run per device under shard_map (splash attention)
    layout.spec = lambda axes, shape: logical_to_spec(axes, shape, mesh, rules)
    return layout


def param_axes(state: nnx.State):
    """Pytree (same structure as `state`) of each parameter's logical axes tuple."""
    return jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh: Mesh, rules=None):
    """NamedSharding for every parameter in an (abstract or concrete) NNX state."""
    def one(v):
        return named_sharding(v.get_metadata()["logical_axes"], v.shape, mesh, rules)
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=None) -> nnx.Module:
    """Place every parameter of `model` on `mesh` by its logical axes (in place); returns model."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    nnx.update(model, state)
    return model


def param_shardings(model: nnx.Module, mesh: Mesh, rules=None):
    """Pure-dict tree (like `nnx.to_pure_dict(nnx.state(model))`) of each parameter's NamedSharding."""
    state = nnx.state(model)
    by_path = {tuple(path): named_sharding(v.get_metadata()["logical_axes"], v.shape, mesh, rules)
               for path, v in nnx.to_flat_state(state)}
    pure = nnx.to_pure_dict(state)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: by_path[tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p)], pure)


def batch_sharding(x, mesh: Mesh, rules=None) -> NamedSharding:
    """Rows over the batch mesh axes, every other dimension replicated."""
    return rows_sharding(x.shape[0], x.ndim, mesh, rules)


# The rollout layout: weights whole on every batch shard (split over `tensor` only, where a replica does
# not fit a chip), rows and KV over the batch axes. A decode step then moves activations, not weights.
ROLLOUT_RULES: dict[str, object] = {**DEFAULT_RULES, "embed": None}

RULE_SETS = {"default": DEFAULT_RULES, "fsdp": FSDP_RULES, "rollout": ROLLOUT_RULES}


def rules_named(name: str) -> dict:
    if name not in RULE_SETS:
        from opd_jax.errors import OpdError
        raise OpdError(f"mesh rules must be one of {', '.join(RULE_SETS)}, got {name!r}")
    return RULE_SETS[name]


def role_devices(mc, role: str):
    """The devices of `role` ("learner", "sampler" or a teacher's name) from mesh.roles: a list of
    device indices or ranges ("0-3", "4-7,12", [0, 1]); None when the role is not listed (it shares
    every device, the default)."""
    from opd_jax.errors import OpdError

    spec = (getattr(mc, "roles", None) or {}).get(role)
    if spec is None:
        return None
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    idx = []
    try:
        for item in items:
            a, _, b = str(item).strip().partition("-")
            idx += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise OpdError(f"mesh.roles.{role}: expected device indices like '0-3' or [0, 1], got {spec!r}") from None
    devices = jax.devices()
    bad = [i for i in idx if not 0 <= i < len(devices)]
    if bad or not idx or len(set(idx)) != len(idx):
        raise OpdError(f"mesh.roles.{role}: devices {spec!r} must be distinct indices in [0, {len(devices) - 1}]")
    return [devices[i] for i in idx]


def mesh_from_config(mc, role: str = "learner") -> Mesh:
    """The mesh of a MeshConfig for `role`: the learner's (data, fsdp, tensor sizes) over its devices
    (mesh.roles.learner, default every device of every process); a teacher or the sampler with
    devices of its own gets a pure (1, n, 1) mesh over them, one sharing the learner's gets its mesh."""
    from opd_jax.errors import OpdError

    own = role_devices(mc, role)
    try:
        if role != "learner" and own is not None:
            return make_mesh((1, -1, 1), own)
        return make_mesh((mc.data, mc.fsdp, mc.tensor), role_devices(mc, "learner"))
    except ValueError as e:
        raise OpdError(f"mesh{'.roles.' + role if own else ''}: {e}") from None


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def rows_spec(n_rows: int, ndim: int, mesh, rules=None) -> P:
    """PartitionSpec of an [n_rows, ...] array: rows over the batch mesh axes (replicated if they
    do not divide), every other dimension replicated. `mesh` needs only its axis sizes."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), (n_rows,) + (1,) * (ndim - 1), mesh, rules)


def rows_sharding(n_rows: int, ndim: int, mesh: Mesh, rules=None) -> NamedSharding:
    return NamedSharding(mesh, rows_spec(n_rows, ndim, mesh, rules))


def placed(x, sharding):
    """`x` with `sharding`: unchanged when it already has it, else moved there."""
    return x if getattr(x, "sharding", None) == sharding else jax.device_put(x, sharding)


def _key_names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def match_state_to_params(params, state, values):
    """Map every leaf of an optimizer `state` to the `values` leaf (a tree like `params`) of the
    parameter it mirrors, or None. A state leaf mirrors a parameter when its key path ends with the
    parameter's path and the shapes agree (Adam's moments, EffOPD's directions, also under masks,
    chains and MultiSteps); counts and scalars mirror nothing."""
    flat_values = jax.tree.structure(params).flatten_up_to(values)  # values' leaves may be tuples
    by_path = {_key_names(p): (tuple(x.shape), v) for (p, x), v in
               zip(jax.tree_util.tree_leaves_with_path(params), flat_values)}
    depth = max((len(k) for k in by_path), default=0)

    def one(path, leaf):
        ks = _key_names(path)
        for n in range(min(depth, len(ks)), 0, -1):
            hit = by_path.get(ks[-n:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return None

    return jax.tree_util.tree_map_with_path(one, state)


def opt_state_shardings(optimizer, params, param_sh, mesh: Mesh):
    """Shardings for `optimizer.init(params)`: parameter-shaped state like its parameter (see
    `match_state_to_params`), everything else replicated. Works on abstract `params`."""
    abstract = jax.eval_shape(optimizer.init, params)
    repl = replicated(mesh)
    matched = match_state_to_params(params, abstract, param_sh)
    return jax.tree.map(lambda m: repl if m is None else m, matched, is_leaf=lambda x: x is None)
