"""Planning a run whose roles own devices (mesh.roles): what each device holds, role by role.

    device d holds   sum of the teachers placed on d: weights + the compiled forward's temporaries
                   + on the learner's devices: the update phase, or (sampler there too) the larger of
                     the update phase and the rollout phase (training state + rollout copy + slots)
                   + on the sampler's own devices: the rollout copy + slots + prompt store + temporaries

The total is the largest device; every role's figures are compiled programs (the teacher's forward
for its mesh and hand-over, the engine's programs for the sampler's mesh), not hand counts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax import sharding as shd
from opd_jax.models.transformer import Transformer


def role_indices(mc, role: str, default: list[int]) -> list[int]:
    devices = shd.role_devices(mc, role)
    if devices is None:
        return default
    ids = [d.id for d in jax.devices()]
    return [ids.index(d.id) for d in devices]


def compile_teacher(cfg, tcfg, rows: int, mesh, what: str) -> dict:
    """The teacher's jitted forward (`teachers._scores`) compiled for `mesh` (pure FSDP by the teacher
    rules) on `rows` rows -> per-device weight bytes and temporary bytes."""
    from opd_jax.rollout_plan import _per_device
    from opd_jax.teachers import _scores

    dc = cfg.data
    rules = shd.rules_named(cfg.mesh.teacher_rules)
    model = nnx.eval_shape(lambda: Transformer(tcfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(state),
                         shd.param_shardings(model, mesh, rules))
    tok_sh = shd.rows_sharding(rows, 2, mesh, rules)
    tokens = jax.ShapeDtypeStruct((rows, dc.max_prompt_len + dc.max_new_tokens), jnp.int32, sharding=tok_sh)
    fn = jax.jit(lambda s, t, m: _scores(graphdef, s, t, m, prompt_len=dc.max_prompt_len,
                                         temperature=dc.temperature, what=what, topk=cfg.loss.topk,
                                         layout=shd.layout_fn(mesh, rules)))
    compiled = fn.lower(state, tokens, tokens).compile()
    return {"weight_bytes_per_device": _per_device(state),
            "forward_temp_bytes_per_device": float(compiled.memory_analysis().temp_size_in_bytes)}


def plan_roles(cfg, out, scfg, tcfgs: dict, rows: int, prompts: int, what: str, n_devices: int) -> dict:
    """Per-role and per-device bytes of a run with mesh.roles, from the learner's compiled plan `out` (a
    plan_report.Plan)
    (update phase, training state) -> {"roles": {role: {...}}, "per_device_max": bytes}."""
    from opd_jax.rollout_plan import compile_rollout

    mc = cfg.mesh
    everything = list(range(n_devices))
    learner = role_indices(mc, "learner", everything)
    sampler = role_indices(mc, "sampler", learner) if "sampler" in mc.roles else learner
    per = {d: 0.0 for d in set(learner) | set(sampler)}
    t_dev = out.teacher_bytes_per_device  # the teachers that share the learner's devices weigh on both phases
    update_phase, rollout_phase = t_dev + out.update_phase_bytes_per_device, t_dev + out.rollout_phase_bytes_per_device
    roles = {"learner": {"devices": len(learner), "update_phase_bytes_per_device": update_phase}}
    state = out.student_bytes_per_device + out.optimizer_bytes_per_device
    if sampler == learner:
        for d in learner:
            per[d] += max(update_phase, rollout_phase)
    else:
        smesh = shd.make_mesh((1, -1, 1), [jax.devices()[i] for i in sampler])
        ro = compile_rollout(cfg, scfg, rows, prompts, smesh)
        alone = (ro["rollout_weight_bytes_per_device"] + ro["slot_bytes_per_device"] +
                 ro["prompt_store_bytes_per_device"] + ro["rollout_temp_bytes_per_device"])
        roles["sampler"] = {"devices": len(sampler), "rollout_bytes_per_device": alone,
                            "decode_collective_bytes_per_step": ro["decode_collective_bytes_per_step"]}
        for d in learner:
            per[d] += update_phase
        for d in sampler:
            per[d] = per.get(d, 0.0) + alone + (state if d in learner else 0.0)
    for name, tcfg in tcfgs.items():
        own = role_indices(mc, name, learner)
        tmesh = shd.make_mesh((1, -1, 1), [jax.devices()[i] for i in own]) if own != learner else None
        if tmesh is None:  # on the learner's devices: already in the learner's plan
            continue
        t = compile_teacher(cfg, tcfg, rows, tmesh, what)
        t["devices"] = len(own)
        roles[name] = t
        for d in own:
            per[d] = per.get(d, 0.0) + t["weight_bytes_per_device"] + t["forward_temp_bytes_per_device"]
    return {"roles": roles, "per_device_max": max(per.values()), "devices_used": len(per)}


def teacher_layout_hint(p, limit: float, cfg) -> str:
    """When co-located teachers weigh on the learner's devices: the mesh.roles that gives them devices
    of their own (enough for their weights at 60% of a device), for the refusal message (p: a Plan)."""
    if not p.teacher_bytes_per_device or cfg.mesh.roles:
        return ""
    n = p.devices
    total = p.teacher_bytes_per_device * n  # teachers are sharded over all n devices
    need = 1 << max(0, math.ceil(math.log2(max(1.0, total / (0.6 * limit)))))
    names = ", ".join(f"{t}: {n}-{n + need - 1}" for t in p.teachers)
    return (f"; or give the teachers devices of their own: mesh.roles {{learner: 0-{n - 1}, {names}}} "
            f"(plan it with opd-jax plan --devices {n + need})")
