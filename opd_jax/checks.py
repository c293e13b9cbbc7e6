"""One configuration check: `check(cfg)` runs every feature's check once, before any model or data is read
and before the run folder is touched, and refuses in one line what no run can honour.

What each check owns:
    config.validate          numbers in range, teacher entries (url, timeout, template fields)
    losses.registry          the estimator and what the teachers must hand over (served teachers: top-k or
                             sampled log-probs)
    xtok_teacher.check_xtok  cross-tokenizer teachers
    horizon.check_horizon    the rollout horizon and its schedule
    teachers                 privileged prompts (check_privileged)
    guard.check_guard        the EffOPD guard / line search
    here                     the combinations: self_live teachers, the guard with asynchronous OPD, mesh roles
What needs the data or the models (routing against the domains, rollout slots against the rows, the
micro-batch, vocabularies, the memory fit) is checked by `run.build_run` as soon as it is known.
"""

from __future__ import annotations

from opd_jax.config import Config, validate
from opd_jax.errors import OpdError
from opd_jax.guard import check_guard
from opd_jax.horizon import check_horizon
from opd_jax.lora import check_lora
from opd_jax.losses.registry import estimator_for, handover, needs_teachers
from opd_jax.packing import check_packing
from opd_jax.teachers import check_privileged
from opd_jax.xtok_teacher import check_xtok


def check(cfg: Config) -> Config:
    """Every configuration check (see the module docstring), once. Returns cfg."""
    validate(cfg)
    estimator_for(cfg.loss)
    if needs_teachers(cfg.loss):
        handover(cfg)
    check_xtok(cfg)
    check_horizon(cfg)
    check_packing(cfg)
    if check_lora(cfg.student.lora):
        oc = cfg.optim
        what = ("optim.mask (a mask names base coordinates; with LoRA only the adapters train)" if oc.mask else
                "the EffOPD guard / line search (its rollback acts on every parameter)"
                if oc.effopd_guard or oc.effopd_line_search else None)
        if what:
            raise OpdError(f"student.lora does not support {what}; drop one of them")
    for t in cfg.teachers:
        check_privileged(t)
        if t.path == "base" and not check_lora(cfg.student.lora):
            raise OpdError(f"teacher {t.name!r} has path: base (the student's base without its LoRA adapters), but "
                           "student.lora is not set; set it, or use path: self")
        if t.reads_learner:  # the teacher is the learner's current weights
            why = ("train.max_staleness >= 1 (the sampler's weights are older than the learner's)"
                   if cfg.train.max_staleness else "a device set of its own in mesh.roles" if t.name in cfg.mesh.roles
                   else "the EffOPD guard / line search (it scores candidate weights against a fixed teacher)"
                   if check_guard(cfg.optim, True) else None)
            if why:
                raise OpdError(f"teacher {t.name!r} is {t.path} (the student's current weights) and cannot be used "
                               f"with {why}; use path: self for the frozen snapshot")
    if check_guard(cfg.optim, needs_teachers(cfg.loss)) and cfg.train.max_staleness:
        raise OpdError("the EffOPD guard / line search (optim.effopd_guard, effopd_line_search) needs synchronous "
                       "training; set train.max_staleness 0")
    roles = ("learner", "sampler") + tuple(t.name for t in cfg.teachers)
    for role in cfg.mesh.roles:
        if role not in roles:
            raise OpdError(f"mesh.roles names {role!r}, which is not a role; roles are {', '.join(roles)}")
    return cfg
