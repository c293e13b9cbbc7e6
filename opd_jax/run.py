"""`build_run(cfg) -> Run`: everything a training run holds fixed, built once, checked before compute.

    Run = mesh and rules (student, teachers) + data (prompt source, tokenizer, prompter, verifiers,
          eval prompts) + the row layout + models (student graphdef, teachers) + the optimizer +
          the state's shardings + the compiled update (the very executable the fit check measured)
          + the rollouts (`opd_jax.rollouts.Rollouts`) + the step-0 `TrainState`.

Order: config and loss checks, distributed runtime, mesh, prompts (template and length errors), the
fit check (compiles the update from shapes, before any weight is read), then the models. Nothing is
written to the run folder here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
from flax import nnx

from opd_jax import checkpoint as ckpt
from opd_jax import distributed as dist
from opd_jax import sharding as shd
from opd_jax.checks import check
from opd_jax.config import Config
from opd_jax.errors import OpdError
from opd_jax.horizon import ProgressiveHorizon, UpdatePrograms, initial_state
from opd_jax.layout import RowLayout
from opd_jax.losses.registry import handover, needs_teachers
from opd_jax.models import ModelConfig, init_model, load_model
from opd_jax.models.transformer import with_runtime
from opd_jax.lora import add_adapters, check_lora, trainable
from opd_jax.optim import make_optimizer
from opd_jax.rollouts import Rollouts
from opd_jax.tasks import Prompter, PromptSource, build_char_tokenizer, load_tokenizer, stop_ids, verifiers_for
from opd_jax.teachers import build_teachers
from opd_jax.train_step import StepSpec, TrainState, new_state, state_shardings


@dataclass(frozen=True)
class Run:
    cfg: Config
    mesh: object
    rules: dict
    source: PromptSource
    rows: RowLayout
    tokenizer: object
    prompter: Prompter
    eval_examples: list
    graphdef: object
    teachers: dict
    teacher_w: dict | None  # hidden-state estimators: each teacher's output matrix, placed as the update expects
    optimizer: object
    state_sh: TrainState  # shardings of the TrainState
    spec: StepSpec
    update: object  # compiled `update(state, batch, teacher_w) -> (state, metrics)` (train_step.UpdateProgram)
    rollouts: Rollouts
    init: TrainState  # the state at step 0 (its buffers are donated to the first update)
    plan: object  # the fit check's plan_report.Plan, its program dropped (None when the device memory is unknown)
    live_w: object = None  # self_live teachers: params -> teacher_w with their output matrices from params

    @property
    def micro(self) -> int:
        return self.spec.micro


def build_student(spec, seed: int, remat: str = "none", mesh=None, rules=None):
    """The student model: read from its HF folder (with a mesh, each device receives only its own
    shard: no full copy on one device) or initialised from `spec.init`."""
    if spec.path:
        model = load_model(spec.path, dtype=spec.dtype, mesh=mesh, rules=rules)
    else:
        try:
            cfg = ModelConfig(**{"param_dtype": spec.dtype, "dtype": spec.dtype, **spec.init})
        except TypeError as e:
            raise OpdError(f"student.init: {e}") from None
        model = init_model(cfg, seed)
    lora = check_lora(spec.lora)
    if lora:  # adapters on the frozen base: only they train (opd_jax.lora)
        add_adapters(model, *lora, seed=seed)
    return with_runtime(model, attention=spec.attention, remat=remat)


def check_model_folder(path, what: str):
    """One-line errors for a model path that is missing or is a file."""
    p = Path(path)
    if not p.exists():
        raise OpdError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise OpdError(f"{what} {p} is a file; it must be a Hugging Face model folder (config.json + safetensors)")


def get_tokenizer(cfg: Config):
    """data.tokenizer, else the student folder's own tokenizer; the built-in character tokenizer only
    for a student initialised from `student.init` (never guessed for a model folder)."""
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    if cfg.student.path:
        folder = Path(cfg.student.path)
        if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
            raise OpdError(f"the student folder {folder} has no tokenizer (tokenizer.json); set data.tokenizer to "
                           "the folder of the tokenizer it was trained with")
        return load_tokenizer(folder)
    return build_char_tokenizer(None)


def build_run(cfg: Config, *, checked: bool = False) -> Run:
    """Check, build and compile everything a run of `cfg` needs (see the module docstring); checked: the
    caller already ran `checks.check(cfg)`."""
    from opd_jax.plan import check_fits
    from opd_jax.update_compile import compile_update_for, full_batch_shapes, pack_unit

    if not checked:
        check(cfg)
    if cfg.student.path:
        check_model_folder(cfg.student.path, "student.path")
    dist.initialize(cfg.distributed)
    if cfg.train.max_staleness and jax.process_count() > 1:
        raise OpdError("train.max_staleness >= 1 runs on one host for now: the sampler thread's collectives "
                       "are not ordered with the learner's across processes; set train.max_staleness 0")
    for role in cfg.mesh.roles:
        shd.role_devices(cfg.mesh, role)
    mesh = shd.mesh_from_config(cfg.mesh)
    rules = shd.rules_named(cfg.mesh.rules)
    dc, tc = cfg.data, cfg.train
    privileged = {t.name for t in cfg.teachers if t.privileged == "answer"}
    source = PromptSource(dc.domains, dc.path, seed=tc.seed,
                          need_answer={d for d, t in cfg.routing.items() if t in privileged})
    rows = RowLayout.build(source.domains, cfg.routing, dc.per_domain, dc.group_size, cfg.loss.lam)
    shd.rules_named(cfg.mesh.rollout_rules)
    if "on" in rows.parts and dc.rollout_slots > rows.rows("on"):
        raise OpdError(f"config data.rollout_slots {dc.rollout_slots} exceeds the {rows.rows('on')} rows sampled per "
                       f"step (prompts x group_size {dc.group_size}); use at most {rows.rows('on')}, or 0 for one each")
    if tc.micro_batch != "auto":
        rows.check_micro_batch(tc.micro_batch, handover(cfg) == "hidden",
                               cfg.loss.baseline)
    tokenizer = get_tokenizer(cfg)
    prompter = Prompter(tokenizer, dc.chat_template, dc.chat_template_kwargs)
    eval_examples = source.batch(0, tc.eval_per_domain, stream=1)
    prompter.encode(eval_examples, dc.max_prompt_len)  # template / length errors now, before any compile
    # the compiled update's memory from shapes only, before any weights are read (resolves micro_batch=auto)
    micro, plan = check_fits(cfg, mesh=mesh, domains=source.domains)
    student = build_student(cfg.student, tc.seed, tc.remat, mesh, rules)
    if student.cfg.vocab_size < len(tokenizer):
        raise OpdError(f"student vocabulary {student.cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    stop = stop_ids(tokenizer, cfg.student.path)
    teachers = (build_teachers(cfg.teachers, cfg.routing, source.domains, student, mesh=mesh,
                               rules=shd.rules_named(cfg.mesh.teacher_rules), tokenizer=tokenizer,
                               roles=cfg.mesh, privileged_rows=(dc.max_privileged_len or 2 * dc.max_prompt_len,
                                                                dc.max_new_tokens), cfg=cfg, stop=stop,
                               prompter=prompter)
                if needs_teachers(cfg.loss) else {})
    graphdef, state = nnx.split(student)
    # explicit shardings at the update's boundary: the state in and out alike, so every step reuses one
    # executable and nothing is resharded between steps
    param_sh = shd.param_shardings(student, mesh, rules)
    params = dist.put_global(nnx.to_pure_dict(state), param_sh)
    optimizer = make_optimizer(cfg.optim, tc.steps, trainable(params))  # with LoRA: the adapters alone
    state_sh = state_shardings(optimizer, params, param_sh, mesh)
    spec = StepSpec.from_config(cfg, rows.routes, micro, shd.layout_fn(mesh, rules))
    program = plan.program if plan else None
    if program is None:
        program = compile_update_for(cfg, spec, graphdef, optimizer, state_sh, params, rows, mesh)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)  # params are donated later
    program = UpdatePrograms(program, full_batch_shapes(cfg, rows, mesh, spec.micro), lambda sh: compile_update_for(  # shorter horizons, fewer packed rows
        cfg, spec, graphdef, optimizer, state_sh, shapes, rows, mesh, batch_shapes=sh))
    teacher_w = live_w = None
    if teachers and spec.handover == "hidden":  # the loss applies each teacher's output matrix
        teacher_w = {n: jax.tree.map(shd.placed, t.output_matrix(), program.teacher_w_sh[n])  # across tokenizers: + map
                     for n, t in teachers.items()}
        live = [n for n, t in teachers.items() if t.live]
        if live:  # self_live: the current student's output matrix, as data (no gradient reaches it)
            out_w = jax.jit(lambda p: jax.lax.stop_gradient(nnx.merge(graphdef, p).output_matrix()))

            def live_w(p):
                w = shd.placed(out_w(p), program.teacher_w_sh[live[0]])
                return {**teacher_w, **{n: w for n in live}}
    opt_state = jax.jit(optimizer.init, out_shardings=state_sh.opt_state)(trainable(params))
    # host scalars, placed as a restored checkpoint's are (every process fills its own copy)
    init = ckpt.placed_state(TrainState, new_state(params, opt_state, jax.random.key(tc.seed),
                                                   initial_state(dc))._asdict(), state_sh)
    rollouts = Rollouts(data=dc, loss=cfg.loss, train=tc, graphdef=graphdef, mesh=mesh, rules=rules, rows=rows, prompter=prompter,
                        stop=stop, verifiers=verifiers_for(dc.verifiers, source.domains),
                        teachers=teachers, source=source,
                        handover=spec.handover, model_cfg=student.cfg,
                        rollout_rules=shd.rules_named(cfg.mesh.rollout_rules),
                        sampler_mesh=(shd.mesh_from_config(cfg.mesh, "sampler") if "sampler" in cfg.mesh.roles
                                      else None),
                        progressive=ProgressiveHorizon(dc) if dc.horizon_schedule == "progressive" else None,
                        cross=bool(spec.cross), pack_unit=pack_unit(rows, mesh, rules, spec.micro))
    if plan:
        plan.program = None  # the run holds it as `update`
    return Run(cfg=cfg, mesh=mesh, rules=rules, source=source, rows=rows, tokenizer=tokenizer, prompter=prompter,
               eval_examples=eval_examples, graphdef=graphdef, teachers=teachers, teacher_w=teacher_w,
               optimizer=optimizer, state_sh=state_sh, spec=spec, update=program, rollouts=rollouts, init=init,
               plan=plan, live_w=live_w)
