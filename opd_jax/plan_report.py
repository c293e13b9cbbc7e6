"""What a plan says: the `Plan` record `plan()` returns, its table (`format_plan`) and the one-line refusal
of a run that does not fit (`refusal`).

A plan holds hand counts from shapes (the breakdown: student, optimizer state, teachers, the slots' KV,
the teachers' outputs, and their sum `hand_total_bytes_per_device`) and, once compiled, the figures of
the compiled programs (the update's arguments and temporaries, the rollout's programs, roles); the
verdict's figure `total_bytes_per_device` is the compiled total when there is one, else the hand count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GiB = 1024 ** 3


@dataclass
class Plan:
    """Bytes are per device unless named otherwise."""

    devices: int
    mesh: dict  # axis -> size
    rows_per_step: int
    sequence: int  # max_prompt_len + max_new_tokens
    micro_batch: object  # rows per micro-batch (0: all)
    student_weight_bytes: float  # all of the student's weights (one whole copy)
    student_params: int
    trainable_params: int  # what the gradient and optimizer state cover: the LoRA adapters, else student_params
    student_bytes_per_device: float
    optimizer_bytes_per_device: float
    optimizer_bytes_total: float
    teachers: dict  # name -> {"params", "bytes_per_device"} of the teachers on the learner's devices
    teacher_bytes_per_device: float
    kv_cache_bytes_per_device: float  # hand count of the slots' KV cache
    teacher_output_bytes_per_device: float
    hand_total_bytes_per_device: float  # the sum of the hand counts above
    total_bytes_per_device: float  # the verdict: compiled total when compiled, else the hand count
    # the compiled update (plan(compile=True))
    activation_bytes_per_device: float | None = None
    compiled_argument_bytes_per_device: float | None = None
    update_phase_bytes_per_device: float | None = None
    # the compiled rollout (`rollout_plan.compile_rollout`), when the run samples
    rollout_phase_bytes_per_device: float | None = None
    rollout_slots: int | None = None
    rollout_prompts: int | None = None
    rollout_weight_bytes_per_device: float | None = None
    slot_bytes_per_device: float | None = None
    prompt_store_bytes_per_device: float | None = None
    rollout_temp_bytes_per_device: float | None = None
    rollout_temps: dict | None = None
    decode_collective_bytes_per_step: float | None = None
    # mesh.roles (`role_plan.plan_roles`), FLOPs and the roofline
    roles: dict | None = None
    packed_rows: dict | None = None  # plan(pack_lengths=): {part: (rows, pack_tokens)} the update is compiled for
    devices_total: int | None = None
    flops_per_step_per_device: float | None = None
    roofline: dict | None = None
    program: object = field(default=None, repr=False, compare=False)  # the compiled update (keep_program)

    @property
    def compiled(self) -> bool:
        return self.update_phase_bytes_per_device is not None

    @property
    def slot_kv_bytes(self) -> float:
        """The slots' KV bytes: the compiled slots' when compiled, else the hand count."""
        return self.slot_bytes_per_device if self.slot_bytes_per_device is not None else self.kv_cache_bytes_per_device

    def as_dict(self) -> dict:
        """Plain data (JSON): the figures that were measured, without the compiled program."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "program" and getattr(self, f.name) is not None}


def format_plan(p: Plan) -> str:
    gib = lambda b: f"{b / GiB:9.3f} GiB"  # noqa: E731
    micro = p.micro_batch or "all"
    lines = [f"mesh {p.mesh} on {p.devices} devices; {p.rows_per_step} rows x {p.sequence} tokens per step "
             f"({micro} rows per micro-batch)",
             f"  student parameters   {gib(p.student_bytes_per_device)}  ({p.student_params / 1e9:.3f} B params)",
             f"  optimizer state      {gib(p.optimizer_bytes_per_device)}"
             + (f"  (LoRA adapters: {p.trainable_params / 1e6:.1f} M trainable params)"
                if p.trainable_params != p.student_params else "")]
    for name, t in p.teachers.items():
        lines.append(f"  teacher {name:<12} {gib(t['bytes_per_device'])}  ({t['params'] / 1e9:.3f} B params)")
    lines += [f"  KV cache (slots)     {gib(p.slot_kv_bytes)}",
              f"  teacher outputs      {gib(p.teacher_output_bytes_per_device)}"]
    for part, (r, L) in (p.packed_rows or {}).items():
        lines.append(f"  packed update ({part})   {r} rows x {L} tokens (data.pack_tokens; first fit of the given "
                     "completion-length mix)")
    if p.compiled:
        lines.append(f"  activations (XLA)    {gib(p.activation_bytes_per_device)}")
        lines.append(f"  update arguments     {gib(p.compiled_argument_bytes_per_device)}  (XLA: parameters, "
                     "optimizer state, batch; the total counts these, not the hand counts above)")
        lines.append(f"  update phase         {gib(p.update_phase_bytes_per_device)}  (arguments + activations)")
    if p.rollout_slots is not None:
        w = p.rollout_weight_bytes_per_device
        lines += [f"  rollout weights      {gib(w)}  (rollout layout; made before each rollout, freed after it)",
                  f"  rollout prompts      {gib(p.prompt_store_bytes_per_device)}  ({p.rollout_prompts} "
                  f"prompts, one prefill each)",
                  f"  rollout temporaries  {gib(p.rollout_temp_bytes_per_device)}",
                  f"  rollout phase        {gib(p.rollout_phase_bytes_per_device)}  (training state + the four "
                  f"above + KV of {p.rollout_slots} slots)",
                  f"  decode step moves    {p.decode_collective_bytes_per_step / 1e6:9.3f} MB between chips "
                  f"({p.decode_collective_bytes_per_step / max(1.0, p.student_weight_bytes):.2%} of the "
                  "student's weights)"]
    if p.flops_per_step_per_device is not None:
        lines.append(f"  FLOPs per step       {p.flops_per_step_per_device:.3e} per device")
    for role, r in (p.roles or {}).items():
        if role == "learner":
            lines.append(f"  role learner         {r['devices']} devices (the figures above)")
        elif role == "sampler":
            lines.append(f"  role sampler         {gib(r['rollout_bytes_per_device'])}  on {r['devices']} devices of its "
                         "own (rollout copy + slots + prompts + temporaries)")
        else:
            lines.append(f"  role {role:<15} {gib(r['weight_bytes_per_device'] + r['forward_temp_bytes_per_device'])}"
                         f"  on {r['devices']} devices of its own (weights {r['weight_bytes_per_device'] / GiB:.3f} + "
                         f"compiled forward {r['forward_temp_bytes_per_device'] / GiB:.3f})")
    total = ("the largest device over every role" if p.roles else
             "teachers + the larger phase" if p.compiled else "hand count")
    lines.append(f"  total                {gib(p.total_bytes_per_device)} per device ({total})")
    if p.roofline and "step_seconds" in p.roofline:
        r = p.roofline
        lines.append(f"  roofline on {r['chip']} (peak rates; decode counted to max_new_tokens):")
        for name in ("prefill", "insert", "decode", "teachers", "update"):
            e = r[name]
            lines.append(f"    {name:<9} {e['seconds_per_call'] * 1e3:10.3f} ms x {e['calls']:>6} calls  "
                         f"({e['bound']}-bound)")
        lines.append(f"    step      {r['step_seconds']:10.3f} s;  {r['new_tokens_per_s_per_chip']:.1f} new tokens/s "
                     "per chip")
    return "\n".join(lines)


def refusal(p: Plan, limit: float, cfg) -> str:
    """The one-line message for a run that does not fit: every part, then what to change."""
    parts = [("student", p.student_bytes_per_device), ("optimizer", p.optimizer_bytes_per_device),
             ("teachers", p.teacher_bytes_per_device), ("KV cache", p.slot_kv_bytes),
             ("teacher outputs", p.teacher_output_bytes_per_device), ("activations", p.activation_bytes_per_device)]
    have = ", ".join(f"{name} {b / GiB:.2f}" for name, b in parts if b is not None)
    when = "" if p.compiled else " before activations"
    m = cfg.train.micro_batch
    if p.compiled and p.rollout_phase_bytes_per_device > p.update_phase_bytes_per_device:
        from opd_jax.rollout_plan import slots_that_fit
        mc = p.mesh
        fit = slots_that_fit(p, limit, mc.get("data", 1) * mc.get("fsdp", 1))
        return (f"this run's rollout needs about {p.total_bytes_per_device / GiB:.2f} GiB per device (KV of "
                f"{p.rollout_slots} slots {p.slot_kv_bytes / GiB:.2f}, rollout weights "
                f"{p.rollout_weight_bytes_per_device / GiB:.2f}, training state and teachers "
                f"{(p.student_bytes_per_device + p.optimizer_bytes_per_device + p.teacher_bytes_per_device) / GiB:.2f})"
                f" but a device has {limit / GiB:.2f} GiB: set data.rollout_slots to {fit} or fewer"
                + (" (none fit: shard wider or shorten data.max_new_tokens)" if fit == 0 else ""))
    from opd_jax.role_plan import teacher_layout_hint
    return (f"this run needs about {p.total_bytes_per_device / GiB:.2f} GiB per device{when} ({have}) but a device "
            f"has {limit / GiB:.2f} GiB: lower the activations with train.remat=full (now {cfg.train.remat}), "
            f"a smaller train.micro_batch (now {m or 'all'} of {p.rows_per_step} rows at once; auto picks the "
            f"largest that fits) or a smaller loss.seq_chunk (now {cfg.loss.seq_chunk}); or shard wider (mesh "
            f"{p.mesh} on {p.devices} devices: more devices or a larger mesh.fsdp), use bfloat16 "
            "(student.dtype / teachers[].dtype), fewer rows per step (data.per_domain, data.group_size), "
            "loss.estimator_type=sampled, or optim.name=sgd" + teacher_layout_hint(p, limit, cfg))
