"""The optimizer from config: clip -> AdamW or SGD with a schedule, optional accumulation."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from opd_jax.errors import OpdError


def make_schedule(cfg, total_steps: int):
    """constant | cosine | linear decay to 0, each after `warmup_steps` of linear warm-up."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    else:
        raise OpdError(f"optim.schedule must be constant, cosine or linear, got {cfg.schedule!r}")
    if cfg.warmup_steps <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), main], [cfg.warmup_steps])


def make_optimizer(cfg, total_steps: int, params=None) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) then AdamW(b1, b2, weight_decay) or SGD(momentum), with the
    schedule; `effopd_window` > 0 wraps it in `effopd` (window, effopd_alpha_max, effopd_min_cos);
    `mask` (a safetensors mask file, needs `params` for its structure) trains only the masked-in
    coordinates; `state_dtype` (e.g. float32 under bfloat16 parameters) keeps the optimizer state and
    the updates in that dtype; `accumulate` > 1 wraps it all in optax.MultiSteps (one update per `accumulate` calls)."""
    sched = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    elif cfg.name == "sgd":
        opt = optax.sgd(sched, momentum=cfg.momentum or None)
    else:
        raise OpdError(f"optim.name must be adamw or sgd, got {cfg.name!r}")
    if cfg.clip_norm and cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    if cfg.effopd_window > 0:
        from opd_jax.optim.effopd import effopd
        opt = effopd(opt, window=cfg.effopd_window, alpha_max=cfg.effopd_alpha_max, min_cos=cfg.effopd_min_cos,
                     fixed_alpha=1.0 if cfg.effopd_line_search else None)  # the trainer rescales each jump
    if cfg.mask:
        from opd_jax.optim.masks import load_mask, masked_optimizer
        if params is None:
            raise OpdError("optim.mask needs the parameters to match the mask against")
        opt = masked_optimizer(opt, load_mask(cfg.mask, params))
    if cfg.state_dtype:
        from opd_jax.optim.precision import with_state_dtype
        try:
            dtype = jnp.dtype(cfg.state_dtype)
        except TypeError:
            dtype = None
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise OpdError(f"optim.state_dtype must be a floating dtype such as float32, got {cfg.state_dtype!r}")
        opt = with_state_dtype(opt, dtype)
    if cfg.accumulate > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=cfg.accumulate)
    return opt
