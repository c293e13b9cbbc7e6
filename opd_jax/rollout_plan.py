"""The planner's rollout half: compile the engine's prefill, insert and decode programs in the rollout
layout (`mesh.rollout_rules`) from shapes only, and read their per-chip bytes and collectives.

Per device, while a step's rollout runs:

    rollout phase = training state (parameters + optimizer state, sharded as for the update)
                  + the rollout weight copy (rollout rules; made before the rollout, freed after it)
                  + the slots (KV [S, L, P+N, K, Dh] x 2, logits [S, V], tokens [S, N], ...)
                  + the prompt store (one prefill per prompt: KV [n, L, P, K, Dh] x 2, logits [n, V])
                  + the largest temporary bytes of the three programs (XLA)

The update never runs beside the rollout copy or the slots, so the fit check takes the larger of the
two phases (plus the teachers, resident in both). The decode program is compiled with one step per
call, so `roofline.collective_bytes` of it is the bytes one decode step moves between chips.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax import sharding as shd
from opd_jax.engine import EngineSpec
from opd_jax.rollout_programs import SLOT_AXES, decode, empty_slots, insert, prefill
from opd_jax.models.transformer import CACHE_AXES, Transformer, unrolled_layers


def _sds(tree, axes, mesh, rules):
    return jax.tree.map(lambda x, ax: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.named_sharding(
        ax, x.shape, mesh, rules)), tree, axes, is_leaf=lambda a: isinstance(a, tuple) and all(
            isinstance(e, (str, type(None))) for e in a))


def _per_device(tree) -> float:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0.0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def compile_rollout(cfg, scfg, rows: int, prompts: int, mesh, *, unroll: bool = False) -> dict:
    """Compile prefill / insert / decode (one step per call) for `rows` sampled rows of `prompts`
    prompts on `mesh` in the rollout layout. -> per-device bytes, the decode step's collective bytes
    and the compiled programs (under "programs"). With a slot per row the engine runs the same prefill
    and decode steps as one program (`rollout_programs.whole_rollout`), whose cache is the slots'; it is
    not compiled here (the slot programs' figures stand for it)."""
    from opd_jax.roofline import collective_bytes

    rules = shd.rules_named(cfg.mesh.rollout_rules)
    rt = tuple(sorted(rules.items()))
    # the trainer's settings (one step per call: the decode program's text is then one step), as an
    # accelerator runs them: stacked layer weights read in place (`EngineSpec.split_layers`; the CPU
    # backend's split decode measured within 2% of its memory on a Qwen3-1.7B recipe, and compiles 3x slower)
    spec = EngineSpec.for_data(cfg.data, rows, cfg.data.temperature, stop=(0,), steps_per_call=1, split_layers=False)
    model = nnx.eval_shape(lambda: Transformer(scfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    sh = shd.param_shardings(model, mesh, rules)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pure, sh)
    slots = _sds(jax.eval_shape(lambda: empty_slots(scfg, spec)), SLOT_AXES, mesh, rules)
    P = spec.prompt_len
    rows_sh = shd.rows_sharding(prompts, 2, mesh, rules)
    ids = jax.ShapeDtypeStruct((prompts, P), jnp.int32, sharding=rows_sh)
    repl = shd.replicated(mesh)
    vec = lambda dt: jax.ShapeDtypeStruct((spec.slots,), dt, sharding=repl)  # noqa: E731
    static = dict(mesh=mesh, rules=rt)
    with unrolled_layers() if unroll else contextlib.nullcontext():
        pre = prefill.lower(graphdef, params, ids, ids, **static).compile()
        store_shapes = jax.eval_shape(lambda p, i: prefill(graphdef, p, i, i, **static), params, ids)
        store = _sds(store_shapes, (CACHE_AXES, CACHE_AXES, ("batch", None), ("batch", None)), mesh, rules)
        ins = insert.lower(slots, store, vec(bool), vec(jnp.int32), vec(jnp.int32), vec(jnp.int32),
                               jax.ShapeDtypeStruct(slots.base.shape, slots.base.dtype, sharding=slots.base.sharding),
                               spec=spec, **static).compile()
        dec = decode.lower(graphdef, params, slots, jax.ShapeDtypeStruct((), jnp.int32, sharding=repl), spec=spec,
                           **static).compile()
        programs = {"prefill": pre, "insert": ins, "decode": dec}
    temps = {name: float(p.memory_analysis().temp_size_in_bytes) for name, p in programs.items()}
    return {"rollout_slots": spec.slots, "rollout_prompts": prompts,
            "rollout_weight_bytes_per_device": _per_device(params),
            "slot_bytes_per_device": _per_device(slots), "prompt_store_bytes_per_device": _per_device(store),
            "rollout_temp_bytes_per_device": max(temps.values()), "rollout_temps": temps,
            "decode_collective_bytes_per_step": collective_bytes(dec.as_text()),
            "programs": programs}


def slots_that_fit(p, limit: float, shards: int) -> int:
    """The most slots (a multiple of the batch shards) whose rollout phase fits `limit` bytes, from a
    compiled plan's rollout figures (a plan_report.Plan; slot bytes scale with the number of slots); 0
    when none do."""
    per_slot = p.slot_bytes_per_device / p.rollout_slots
    fixed = p.rollout_phase_bytes_per_device - p.slot_bytes_per_device + p.teacher_bytes_per_device
    n = int((limit - fixed) // per_slot) if per_slot else p.rows_per_step
    n = min(n, p.rows_per_step)
    return max(0, n - n % shards) if n >= shards else max(0, n)
