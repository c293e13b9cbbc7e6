"""`opd-jax plan`: per-device memory and per-step FLOPs of a config on its target mesh, from shapes only.

Nothing is allocated. Parameter shapes come from `nnx.eval_shape` of the model (config.json only,
no weights are read), optimizer state from `jax.eval_shape(optimizer.init, ...)`, and each array's
per-device share from its logical axes and the rules table on the target mesh:

    bytes_per_device(x) = size(x) * itemsize(x) / prod(mesh sizes of the axes that shard x)

Rows per step B = len(domains) * per_domain * group_size, sequence S = max_prompt_len + max_new_tokens:
    KV cache (sampling)  = 2 * L * B * S * kv_heads * head_dim * itemsize, sharded by CACHE_AXES
    teacher outputs      = sum over teachers of B_t * N * D_t * itemsize (hidden states, full / top-k;
                           the loss applies each output matrix chunk by chunk), B * N * 4 (sampled)
With `compile=True` the run's update is also lowered and compiled for the mesh (on fake CPU devices
when planning a TPU run on a laptop), the very executable the trainer then runs: the total becomes
its `memory_analysis()` argument bytes (parameters, optimizer state, every batch part with the
teachers' outputs) plus its temporary (activation) bytes plus the teachers' weights and the KV cache;
the hand counts above stay as the printed breakdown. `cost_analysis()` gives the FLOPs of one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax import sharding as shd
from opd_jax.errors import OpdError
from opd_jax.layout import RowLayout
from opd_jax.losses.registry import handover, needs_teachers
from opd_jax.models.transformer import CACHE_AXES, Transformer
from opd_jax.rollout_plan import compile_rollout
from opd_jax.train_step import state_shardings
from opd_jax.update_compile import (abstract_params, compile_update_for, model_config, teacher_configs,  # noqa: F401
                                    teacher_outputs)

from opd_jax.plan_report import GiB, Plan, format_plan, refusal  # noqa: F401 (public here too)


@dataclass(frozen=True)
class MeshShape:
    """Only the axis sizes of a mesh: enough for `logical_to_spec` and byte counts, no devices."""
    shape: dict


def mesh_shape(mc, n_devices: int) -> MeshShape:
    try:
        return MeshShape(shd.mesh_sizes((mc.data, mc.fsdp, mc.tensor), n_devices))
    except ValueError as e:
        raise OpdError(f"mesh: {e}") from None


def shard_bytes(shape, dtype, spec, mesh: MeshShape) -> float:
    """Bytes one device holds of an array with PartitionSpec `spec`."""
    div = 1
    for entry in spec:
        for name in ((entry,) if isinstance(entry, str) else (entry or ())):
            div *= mesh.shape.get(name, 1)
    return math.prod(shape) * jnp.dtype(dtype).itemsize / div


def tree_bytes(shapes, axes, mesh: MeshShape, rules) -> tuple[float, int]:
    """(per-device bytes, total elements) of a tree of ShapeDtypeStruct with logical axes."""
    per_dev, count = 0.0, 0
    for x, ax in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple))):
        per_dev += shard_bytes(x.shape, x.dtype, shd.logical_to_spec(ax, x.shape, mesh, rules), mesh)
        count += math.prod(x.shape)
    return per_dev, count


def optimizer_bytes(optimizer, shapes, axes, mesh: MeshShape, rules) -> tuple[float, float]:
    """(per-device bytes, total bytes) of optimizer.init(params): parameter-shaped state sharded like
    its parameter, the rest (counts) replicated."""
    state = jax.eval_shape(optimizer.init, shapes)
    matched = shd.match_state_to_params(shapes, state, axes)
    per_dev = total = 0.0
    for x, ax in zip(jax.tree.leaves(state), jax.tree.structure(state).flatten_up_to(matched)):
        spec = shd.logical_to_spec(ax, x.shape, mesh, rules) if ax is not None else ()
        per_dev += shard_bytes(x.shape, x.dtype, spec, mesh)
        total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return per_dev, total


def plan(cfg, *, n_devices: int | None = None, compile: bool = False, flops: bool = False, mesh=None,
         domains=None, keep_program: bool = False, roofline: str | None = None,
         pack_lengths: tuple | None = None) -> Plan:
    """Per-device bytes of every part of a run of `cfg` on `n_devices` (default: all devices) and,
    with `compile`, the temporary bytes of the compiled step: the same scanned, rematerialised program
    the trainer runs (its attention and `train.remat`). `flops` compiles once more with the layer loop
    unrolled, because XLA's cost analysis counts a loop body once. `mesh` (a real one; default: one
    built on the first n_devices devices) and `domains` (default `RowLayout.from_config`) are the
    trainer's; `keep_program` keeps the compiled update under "program" for the trainer to run.
    `roofline` (a chip name, `roofline.CHIPS`) adds a roofline estimate of the step's time on it.
    pack_lengths (median, p99) with data.pack_tokens: compile the update for the packed rows a step of
    that long-tailed completion mix needs (`packing.expected_rows`), not for the most rows a step can need."""
    compile = compile or bool(roofline)
    from opd_jax.optim import make_optimizer
    from opd_jax.lora import trainable

    n_devices = n_devices or (mesh.devices.size if mesh is not None else jax.device_count())
    n_total = n_devices  # mesh.roles: the learner's share of them
    if mesh is None and shd.role_devices(cfg.mesh, "learner") is not None:
        n_devices = len(shd.role_devices(cfg.mesh, "learner"))
    real_mesh, mesh = mesh, mesh_shape(cfg.mesh, n_devices)
    rules, trules = shd.rules_named(cfg.mesh.rules), shd.rules_named(cfg.mesh.teacher_rules)
    scfg = model_config(cfg.student).replace(attention=cfg.student.attention, remat=cfg.train.remat)
    shapes, axes = abstract_params(scfg)
    p_dev, n_params = tree_bytes(shapes, axes, mesh, rules)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps, trainable(shapes))  # LoRA: the adapters alone
    o_dev, o_total = optimizer_bytes(optimizer, trainable(shapes), trainable(axes), mesh, rules)
    n_trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(trainable(shapes)))

    rl = RowLayout.from_config(cfg, domains)
    if needs_teachers(cfg.loss):  # the trainer's routing errors, before any compile
        from opd_jax.teachers import check_routing
        check_routing(cfg.teachers, cfg.routing, rl.domains)
    teachers, t_dev = {}, 0.0
    tcfgs = teacher_configs(cfg, scfg, rl)
    own = {n for n in tcfgs if n in cfg.mesh.roles}  # teachers on devices of their own (role_plan)
    shared = {t.name for t in cfg.teachers if t.reads_learner}  # no bytes of their own
    for name, tcfg in tcfgs.items():
        if name in own or name in shared:
            continue
        tb, tn = tree_bytes(*abstract_params(tcfg), mesh, trules)
        teachers[name] = {"params": tn, "bytes_per_device": tb}
        t_dev += tb

    dc = cfg.data
    rows = rl.rows("on" if "on" in rl.parts else "off")
    seq = dc.max_prompt_len + dc.max_new_tokens
    slots = min(dc.rollout_slots or rows, rows) if "on" in rl.parts else 0  # the engine's KV lives per slot
    cache_shape = (slots, scfg.num_layers, seq, scfg.num_kv_heads, scfg.head_dim)
    cache_dev = 2 * shard_bytes(cache_shape, scfg.dtype, shd.logical_to_spec(
        CACHE_AXES, cache_shape, mesh, shd.rules_named(cfg.mesh.rollout_rules)), mesh)
    tout_dev = sum(shard_bytes(x.shape, x.dtype, shd.rows_spec(x.shape[0], x.ndim, mesh, rules), mesh)
                   for x in jax.tree.leaves(teacher_outputs(cfg, rl, rows, dc.max_new_tokens, tcfgs)))

    hand = p_dev + o_dev + t_dev + cache_dev + tout_dev
    out = Plan(devices=n_devices, mesh=mesh.shape, rows_per_step=rows, sequence=seq, micro_batch=cfg.train.micro_batch,
               student_weight_bytes=sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes)),
               student_params=n_params, trainable_params=n_trainable, student_bytes_per_device=p_dev,
               optimizer_bytes_per_device=o_dev,
               optimizer_bytes_total=o_total, teachers=teachers, teacher_bytes_per_device=t_dev,
               kv_cache_bytes_per_device=cache_dev, teacher_output_bytes_per_device=tout_dev,
               hand_total_bytes_per_device=hand, total_bytes_per_device=hand)
    if compile or flops:
        if cfg.train.micro_batch == "auto":
            raise OpdError("plan(): resolve train.micro_batch=auto first (fit_micro_batch)")
        real_mesh = real_mesh or target_mesh(cfg, n_devices)
        if pack_lengths:
            if not dc.pack_tokens:
                raise OpdError("--pack-lengths plans packed rows: set data.pack_tokens too")
            from opd_jax.packing import expected_rows
            from opd_jax.update_compile import pack_unit
            out.packed_rows = expected_rows(cfg, rl, *pack_lengths, *pack_unit(
                rl, real_mesh, rules, cfg.train.micro_batch))
        mem, program = compile_step(cfg, scfg, optimizer, shapes, rl, n_devices, mesh=real_mesh,
                                    batch_shapes=out.packed_rows)
        # the compiled update's own figures: its arguments (parameters, optimizer state, every batch part
        # with the teachers' outputs, the output matrices) and temporaries
        out.activation_bytes_per_device = mem["activation_bytes_per_device"]
        out.compiled_argument_bytes_per_device = mem["compiled_argument_bytes_per_device"]
        out.update_phase_bytes_per_device = out.compiled_argument_bytes_per_device + out.activation_bytes_per_device
        out.rollout_phase_bytes_per_device = 0.0
        if "on" in rl.parts:  # the rollout: the engine's programs in the rollout layout beside the training state
            ro = compile_rollout(cfg, scfg, rows, rows // dc.group_size, real_mesh)
            for k, v in ro.items():
                if k != "programs":
                    setattr(out, k, v)
            out.rollout_phase_bytes_per_device = (p_dev + o_dev + ro["rollout_weight_bytes_per_device"]
                                                  + ro["slot_bytes_per_device"] + ro["prompt_store_bytes_per_device"]
                                                  + ro["rollout_temp_bytes_per_device"])
        # the two phases never overlap: the rollout copy and the slots are freed before the update
        out.total_bytes_per_device = t_dev + max(out.update_phase_bytes_per_device, out.rollout_phase_bytes_per_device)
        if cfg.mesh.roles:  # roles on devices of their own: each device's load, role by role (compiled)
            from opd_jax.role_plan import plan_roles
            what = handover(cfg)
            rp = plan_roles(cfg, out, scfg, {n: tcfgs[n] for n in own}, rows, rows // dc.group_size, what, n_total)
            out.roles, out.devices_total = rp["roles"], rp["devices_used"]
            out.total_bytes_per_device = rp["per_device_max"]
        if keep_program:
            out.program = program
    if flops or roofline:
        _, unrolled = compile_step(cfg, scfg, optimizer, shapes, rl, n_devices, mesh=real_mesh, unroll=True,
                                   batch_shapes=out.packed_rows)
        out.flops_per_step_per_device = unrolled.flops()
    if roofline:
        out.roofline = step_roofline(cfg, scfg, rl, tcfgs, unrolled, real_mesh or target_mesh(cfg, n_devices),
                                        n_devices, roofline)
    return out


def target_mesh(cfg, n_devices: int):
    """The run's mesh on the first n_devices devices of this process (fake CPU devices when planning)."""
    if jax.device_count() < n_devices:
        raise OpdError(f"compiling for {n_devices} devices needs that many devices; this process has "
                       f"{jax.device_count()} (on CPU: opd-jax plan --devices {n_devices} fakes them)")
    learner = shd.role_devices(cfg.mesh, "learner")
    return shd.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), learner or jax.devices()[:n_devices])


def step_roofline(cfg, scfg, rl: RowLayout, tcfgs: dict, update, mesh, n_devices: int, chip_name: str) -> dict:
    """Roofline seconds of one step on `chip_name` (`opd_jax.roofline`): the engine's programs compiled
    with the layers unrolled, the update, and the teachers' forward passes (a hand count: 2 x teacher
    parameters x tokens FLOPs, compute-bound). Decode steps are counted as if every sequence ran to
    max_new_tokens, in ceil(rows / slots) waves: an upper bound for a long-tailed mix."""
    from opd_jax.roofline import Estimate, chip, estimate

    ch = chip(chip_name)
    dc = cfg.data
    out = {"chip": ch.name}
    if "on" not in rl.parts:
        return out
    rows = rl.rows("on")
    ro = compile_rollout(cfg, scfg, rows, rows // dc.group_size, mesh, unroll=True)
    est = {n: estimate(p, ch) for n, p in ro["programs"].items()}
    est["update"] = estimate(update.compiled, ch)
    tokens = rows * (dc.max_prompt_len + dc.max_new_tokens)
    t_flops = sum(2.0 * tree_bytes(*abstract_params(c), MeshShape({}), {})[1] * tokens for c in tcfgs.values())
    est["teachers"] = Estimate(t_flops / n_devices, 0.0, 0.0, ch)
    waves = math.ceil(rows / ro["rollout_slots"])
    calls = {"prefill": 1, "insert": waves, "decode": waves * dc.max_new_tokens, "update": 1, "teachers": 1}
    for name, e in est.items():
        out[name] = {"seconds_per_call": e.seconds, "bound": e.bound, "calls": calls[name], "flops": e.flops,
                     "hbm_bytes": e.hbm_bytes, "collective_bytes": e.collective_bytes}
    out["step_seconds"] = sum(out[n]["seconds_per_call"] * calls[n] for n in est)
    out["new_tokens_per_s_per_chip"] = rows * dc.max_new_tokens / out["step_seconds"] / n_devices
    return out


def compile_step(cfg, scfg, optimizer, shapes, rl: RowLayout, n_devices: int, mesh=None, unroll: bool = False,
                 batch_shapes: dict | None = None):
    """Lower and compile the run's update for its mesh on `n_devices` real (or fake CPU) devices ->
    (XLA's temporary bytes (activations) and argument bytes, the UpdateProgram)."""
    from opd_jax.train_step import StepSpec

    mesh = mesh or target_mesh(cfg, n_devices)
    rules = shd.rules_named(cfg.mesh.rules)
    model = nnx.eval_shape(lambda: Transformer(scfg, rngs=nnx.Rngs(0)))
    state_sh = state_shardings(optimizer, shapes, shd.param_shardings(model, mesh, rules), mesh)
    spec = StepSpec.from_config(cfg, rl.routes, cfg.train.micro_batch, shd.layout_fn(mesh, rules))
    program = compile_update_for(cfg, spec, nnx.graphdef(model), optimizer, state_sh, shapes, rl, mesh, unroll=unroll,
                                 batch_shapes=batch_shapes)
    return program.memory(), program


def device_memory_bytes(cfg) -> float | None:
    """Usable memory of one device: `mesh.device_memory_gb` if set, else what the device reports."""
    if cfg.mesh.device_memory_gb:
        return cfg.mesh.device_memory_gb * GiB
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory statistics: no limit known
        stats = {}
    return float(stats["bytes_limit"]) if "bytes_limit" in stats else None


def micro_batch_candidates(cfg, n_devices: int, domains=None) -> list[int]:
    """Rows per micro-batch worth trying, largest first (0 = all rows at once): those that split every
    part's rows (and, in the hidden-state modes, every teacher's rows) exactly, keep a prompt's samples
    together and still spread over the batch mesh axes (fewer rows than batch shards would be
    replicated and save nothing)."""
    rl = RowLayout.from_config(cfg, domains)
    hidden = handover(cfg) == "hidden"
    mesh = mesh_shape(cfg.mesh, n_devices)
    shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    out = [0]
    for m in range(max(rl.part_rows().values()) - 1, 0, -1):
        if m % shards:
            continue
        try:
            rl.check_micro_batch(m, hidden, cfg.loss.baseline)
        except OpdError:
            continue
        out.append(m)
    return out


def fit_micro_batch(cfg, n_devices: int | None = None, limit: float | None = None, *, mesh=None, domains=None,
                    keep_program: bool = False) -> tuple[int, dict]:
    """train.micro_batch=auto: the largest candidate (`micro_batch_candidates`) whose compiled update
    fits `limit` bytes per device (default `device_memory_bytes`; unknown: all rows at once).
    -> (micro_batch, its plan). A one-line OpdError when even the smallest does not fit."""
    import dataclasses

    limit = device_memory_bytes(cfg) if limit is None else limit
    n_devices = n_devices or (mesh.devices.size if mesh is not None else jax.device_count())
    with_micro = lambda m: dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch=m))  # noqa: E731
    if limit is None:
        return 0, plan(with_micro(0), n_devices=n_devices, mesh=mesh, domains=domains)
    p = None
    for m in micro_batch_candidates(cfg, n_devices, domains):
        p = plan(with_micro(m), n_devices=n_devices, compile=True, mesh=mesh, domains=domains,
                 keep_program=keep_program)
        if p.total_bytes_per_device <= limit:
            return m, p
    raise OpdError(refusal(p, limit, with_micro(m)))


def check_fits(cfg, n_devices: int | None = None, *, mesh=None, domains=None) -> tuple[int, dict | None]:
    """Before any weight is read: compile the run's update for the mesh (abstract shapes only) and
    raise a one-line OpdError naming what to change when weights, optimizer state, teachers, KV cache,
    teacher outputs and the update's activations exceed one device's memory. Without a known device
    memory (CPU without mesh.device_memory_gb) nothing is compiled or checked. Resolves
    train.micro_batch=auto. -> (rows per micro-batch, the plan with the compiled update under
    "program", or None)."""
    limit = device_memory_bytes(cfg)
    micro = cfg.train.micro_batch
    if micro == "auto":
        return fit_micro_batch(cfg, n_devices, limit, mesh=mesh, domains=domains, keep_program=True)
    if limit is None:
        return micro, None
    p = plan(cfg, n_devices=n_devices, compile=True, mesh=mesh, domains=domains, keep_program=True)
    if p.total_bytes_per_device > limit:
        raise OpdError(refusal(p, limit, cfg))
    return micro, p


__all__ = ["plan", "check_fits", "fit_micro_batch", "micro_batch_candidates", "format_plan", "abstract_params", "mesh_shape"]
