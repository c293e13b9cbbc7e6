"""The update's compiler, beside the update (`train_step.compile_update`): the abstract TrainState and
batch a run's update is compiled with, from shapes only (config.json files, no weights), and
`compile_update_for`, which the run (the executable it trains with) and the planner (the figures it
reports) both call."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax import sharding as shd
from opd_jax.errors import OpdError
from opd_jax.layout import RowLayout
from opd_jax.losses.registry import estimator_for, handover, needs_teachers
from opd_jax.models import ModelConfig
from opd_jax.models.transformer import Transformer, unrolled_layers
from opd_jax.train_step import TrainState, compile_update
from opd_jax.batch import Part
from opd_jax.lora import base_config, trainable, with_lora
from opd_jax.packing import packed_rows
from opd_jax.horizon import initial_state
from opd_jax.xtok_teacher import xtok_names


def model_config(spec, student_cfg: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of a student/teacher spec from its config.json (weights are not read)."""
    if getattr(spec, "is_student", False):  # a TeacherSpec reading the student's weights (spec may be None)
        return student_cfg if spec.path != "base" else base_config(student_cfg)
    if hasattr(spec, "lora"):  # the student (ModelSpec): its adapters are parameters too
        return with_lora(_model_config(spec), spec.lora)
    return _model_config(spec)


def _model_config(spec) -> ModelConfig:
    if spec.path:
        cfg_file = Path(spec.path) / "config.json"
        if not cfg_file.exists():
            raise OpdError(f"no config.json in {spec.path}")
        return ModelConfig.from_hf(json.loads(cfg_file.read_text()), param_dtype=spec.dtype)
    init = dict(getattr(spec, "init", None) or {})
    return ModelConfig(**{"param_dtype": spec.dtype, "dtype": spec.dtype, **init})


def abstract_params(mcfg: ModelConfig):
    """(pure dict of jax.ShapeDtypeStruct, pure dict of logical-axes tuples) without allocating."""
    state = nnx.state(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype), state,
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shapes), nnx.to_pure_dict(axes)


def teacher_configs(cfg, scfg, rl: RowLayout) -> dict:
    """name -> ModelConfig of every teacher the run loads (none for pure reward RL)."""
    if not needs_teachers(cfg.loss):
        return {}
    used = set(rl.teachers())
    return {t.name: model_config(t, scfg) for t in cfg.teachers if t.name in used and not t.url}  # served: elsewhere


def teacher_outputs(cfg, rl: RowLayout, rows: int, n_new: int, tcfgs: dict):
    """Abstract teacher hand-over of one batch part of `rows` rows (`Estimator.teacher_shape`): hidden
    states {name: [its rows, N, D_t]} in the teacher's compute dtype, top-k (log-probs, ids)
    [B, N, k] (served teachers), or [B, N] float32 log-probs (also the zeros a run without teachers
    feeds)."""
    lc = cfg.loss
    est = estimator_for(lc)
    what = handover(cfg)
    if what == "topk":
        return (jax.ShapeDtypeStruct((rows, n_new, lc.topk), jnp.float32),
                jax.ShapeDtypeStruct((rows, n_new, lc.topk), jnp.int32))
    if what != "hidden" or not tcfgs:
        return jax.ShapeDtypeStruct((rows, n_new), jnp.float32)
    return {n: est.teacher_shape(len(idx), n_new, tcfgs[n].hidden_size, tcfgs[n].dtype)
            for n, idx in rl.groups(rows).items()}


def pack_unit(rl: RowLayout, mesh, rules=None, micro: int = 0) -> tuple[int, int]:
    """data.pack_tokens: (the rows each domain block of a packed part comes in multiples of: the micro-batch
    rows, so every teacher's rows split into whole micro-batches; the batch shards of `mesh`)."""
    import math

    spec = shd.rows_spec(1 << 20, 1, mesh, rules)[0]
    axes = () if spec is None else spec if isinstance(spec, tuple) else (spec,)
    return micro or 1, math.prod(mesh.shape[a] for a in axes)


def full_batch_shapes(cfg, rl: RowLayout, mesh, micro: int = 0) -> dict:
    """{part: its tokens' shape} of the update the fit check compiles: padded rows [B, P + N], or with
    data.pack_tokens the most packed rows a part can need (every sequence alone in its row: as many rows as
    the padded part) x pack_tokens; a step compiles the shorter horizons and fewer packed rows it brings."""
    dc = cfg.data
    if not dc.pack_tokens:
        return {part: (rl.rows(part), dc.max_prompt_len + dc.max_new_tokens) for part in rl.parts}
    unit, shards = pack_unit(rl, mesh, shd.rules_named(cfg.mesh.rules), micro)
    n = len(rl.domains)
    return {part: (n * packed_rows(rl.rows(part) // n, rl.rows(part) // n, n, unit, shards), dc.pack_tokens)
            for part in rl.parts}


def abstract_batch(cfg, rl: RowLayout, tcfgs: dict, shapes: dict) -> dict:
    """The update's batch {"on": Part, "off": Part} of jax.ShapeDtypeStruct: every part the run feeds it (on- and
    off-policy); shapes: {part: its tokens' shape} (`full_batch_shapes`, or a rollout horizon's shorter rows,
    or with data.pack_tokens a step's packed rows [R, L])."""
    dc = cfg.data
    P = dc.max_prompt_len
    sds = jax.ShapeDtypeStruct
    out = {}
    for part in rl.parts:
        b = rl.rows(part)
        on = part == "on"
        if dc.pack_tokens:  # packed rows (`opd_jax.packing`): per-token arrays at the [R, L - 1] targets
            R, L = shapes[part]
            t = sds((R, L - 1), jnp.float32)
            out[part] = Part(sds((R, L), jnp.int32), sds((R, 1), jnp.int32), sds((R, L - 1), jnp.int32),
                             teacher_outputs(cfg, rl, R, L - 1, tcfgs), t if on else None,
                             sds((b,), jnp.float32) if on else None,
                             t if cfg.loss.normalize == "sequence" else None, sds((R, L), jnp.int32),
                             sds((R, L - 1), jnp.int32), sds((b,), jnp.float32))
            continue
        N = shapes[part][1] - P
        cross = needs_teachers(cfg.loss) and set(xtok_names(cfg)) & set(rl.teachers())  # covered positions
        out[part] = Part(sds((b, P + N), jnp.int32), sds((b, P), jnp.int32), sds((b, N), jnp.int32),
                         teacher_outputs(cfg, rl, b, N, tcfgs), sds((b, N), jnp.float32) if on else None,
                         sds((b,), jnp.float32) if on else None, sds((b, N), jnp.int32) if cross else None)
    return out


def compile_update_for(cfg, spec, graphdef, optimizer, state_sh, params, rl: RowLayout, mesh, unroll: bool = False,
                       batch_shapes: dict | None = None):
    """Compile the run's update for `mesh` from shapes (`params`: arrays or ShapeDtypeStructs): the
    one executable the trainer runs and the fit check measures (batch_shapes: default `full_batch_shapes`).
    -> train_step.UpdateProgram."""
    scfg = model_config(cfg.student)
    tcfgs = teacher_configs(cfg, scfg, rl)
    batch_shapes = batch_shapes or full_batch_shapes(cfg, rl, mesh, spec.micro)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    abstract_state = TrainState(shapes, jax.eval_shape(optimizer.init, trainable(shapes)), jax.ShapeDtypeStruct((), jnp.int32),
                                jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
                                jax.ShapeDtypeStruct((), jnp.int32),  # params, opt_state, step, rng, data position
                                jax.ShapeDtypeStruct(initial_state(cfg.data).shape, jnp.float32))  # horizon state
    teacher_w = None
    if handover(cfg) == "hidden" and tcfgs:  # placed as its weights are (teacher rules)
        trules = shd.rules_named(cfg.mesh.teacher_rules)
        V = scfg.vocab_size
        cross = xtok_names(cfg)
        teacher_w = {}
        for n, c in tcfgs.items():
            v = c.vocab_size if n in cross else V  # a cross-tokenizer teacher: its own vocabulary, and the map
            w = jax.ShapeDtypeStruct((c.hidden_size, v), c.dtype, sharding=shd.named_sharding(
                ("embed", "vocab"), (c.hidden_size, v), mesh, trules))
            teacher_w[n] = w if n not in cross else {"w": w, "map": jax.ShapeDtypeStruct(
                (v,), jnp.int32, sharding=shd.replicated(mesh))}
    with unrolled_layers() if unroll else contextlib.nullcontext():  # unrolled: cost_analysis() counts every layer
        return compile_update(graphdef, optimizer, spec, state_sh, abstract_state, abstract_batch(cfg, rl, tcfgs, batch_shapes),
                              teacher_w, mesh=mesh, rules=shd.rules_named(cfg.mesh.rules))
