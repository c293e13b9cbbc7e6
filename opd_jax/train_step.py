"""The jitted student update: recompute the student on the rollout, take the configured loss, step optax.

A batch is a dict of arrays, grouped by domain, with
  tokens [B, P+N], prompt_mask [B, P], mask [B, N] (1 on generated tokens incl. EOS),
  sampler_logprobs [B, N], rewards [B], and the teacher's scores at the completion positions:
  teacher [B, N, V] logits ("full"), [B, N] log-probs ("sampled"), or (log-probs, ids) ("topk").
GKD: `on` is such a batch from the student's samples, `off` the same from dataset answers; the
loss is lam * L(on) + (1 - lam) * L(off) and either may be absent when lam is 1 or 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from opd_jax import losses as L
from opd_jax.errors import OpdError

ESTIMATOR_TYPES = ("full", "sampled", "topk")


def uses_rl(lc) -> bool:
    return lc.rl_alpha < 1.0 or lc.rl_mode == "replace"


def teacher_output_kind(lc) -> str:
    """What the teachers must return for this loss config."""
    return {"full": "logits", "sampled": "logprobs", "topk": "topk"}[lc.estimator_type]


def check_loss_config(lc):
    if lc.estimator_type not in ESTIMATOR_TYPES:
        raise OpdError(f"loss.estimator_type must be one of {ESTIMATOR_TYPES}, got {lc.estimator_type!r}")
    if uses_rl(lc) and lc.estimator_type != "sampled":
        raise OpdError("RL + OPD (loss.rl_alpha < 1 or rl_mode=replace) needs loss.estimator_type=sampled")
    if not 0.0 <= lc.lam <= 1.0:
        raise OpdError(f"loss.lam must be in [0, 1], got {lc.lam}")
    L.get_fdiv(lc.kind, beta=lc.beta, alpha=lc.alpha_div)


def policy_loss(model, b, lc, prompt_len: int, group_size: int, temperature: float):
    """(loss, metrics) of one batch under the loss config `lc`."""
    tokens, mask = b["tokens"], b["mask"]
    full_mask = jnp.concatenate([b["prompt_mask"], mask], axis=1)
    h = model.completion_hidden(tokens, full_mask, prompt_len)
    w = model.output_matrix()
    comp = tokens[:, prompt_len:]
    slp = L.chunked_token_logprobs(h, w, comp, temperature=temperature, seq_chunk=lc.seq_chunk)
    div = dict(kind=lc.kind, beta=lc.beta, alpha=lc.alpha_div)
    if lc.estimator_type == "full":
        loss, m = L.chunked_divergence_loss(h, w, mask, teacher_logits=b["teacher"], temperature=temperature,
                                            normalize=lc.normalize, seq_chunk=lc.seq_chunk, **div)
    elif lc.estimator_type == "topk":
        logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
        loss, m = L.topk_distill_loss(logits, b["teacher"][0], b["teacher"][1], mask, temperature=temperature,
                                      normalize=lc.normalize, **div)
    elif uses_rl(lc):
        loss, m = L.rl_opd_surrogate(slp, b["teacher"], b["rewards"], mask, group_size=group_size, alpha=lc.rl_alpha,
                                     mode=lc.rl_mode, kind=lc.kind, estimator=lc.estimator, beta=lc.beta,
                                     div_alpha=lc.alpha_div, sampler_logprobs=b.get("sampler_logprobs"),
                                     clip_eps=lc.clip_eps, normalize=lc.normalize)
    else:
        loss, m = L.sampled_surrogate(slp, b["teacher"], mask, estimator=lc.estimator, level=lc.level,
                                      baseline=lc.baseline,
                                      sampler_logprobs=b.get("sampler_logprobs"), clip_eps=lc.clip_eps,
                                      normalize=lc.normalize, **div)
    if "sampler_logprobs" in b:
        m["logprob_mismatch"] = jax.lax.stop_gradient(
            L.masked_mean(jnp.abs(slp - b["sampler_logprobs"]), mask))
    m["student_logprob"] = jax.lax.stop_gradient(L.masked_mean(slp, mask))
    per_tok = m.pop("per_token_divergence")
    m["row_divergence"] = jnp.sum(L.clean(per_tok, mask), -1) / jnp.maximum(jnp.sum(mask, -1), 1)
    return loss, m


def _update(graphdef, params, opt_state, batch, *, optimizer, lc, prompt_len, group_size, temperature):
    """One optax update. params: pure dict of the student's parameters. -> (params, opt_state, loss, metrics)."""

    def loss_fn(p):
        model = nnx.merge(graphdef, p)
        parts = {k: policy_loss(model, batch[k], lc, prompt_len, group_size, temperature) for k in ("on", "off") if k in batch}
        if len(parts) == 2:
            return L.gkd_loss(parts["on"], parts["off"], lc.lam)
        (key, (loss, m)), = parts.items()
        return loss, {f"{'on' if key == 'on' else 'off'}_policy/{k}": v for k, v in m.items()}

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["loss"] = loss
    return params, opt_state, loss, metrics


# Shardings follow the (committed) inputs; the trainer uses `sharded_train_step` instead.
train_step = jax.jit(_update, static_argnames=("graphdef", "optimizer", "lc", "prompt_len", "group_size", "temperature"),
                     donate_argnums=(1, 2))


def sharded_train_step(graphdef, *, optimizer, lc, prompt_len: int, group_size: int, temperature: float, mesh,
                       param_sh, opt_sh, rules=None):
    """`_update` under `jax.jit` with explicit shardings at the boundary: params and optimizer state
    in and out as `param_sh` / `opt_sh` (donated), every batch array's rows over the batch mesh axes,
    loss and metrics replicated. One executable per batch layout (the trainer has one).
    Returns step(params, opt_state, batch) -> (params, opt_state, loss, metrics)."""
    from opd_jax.sharding import placed, replicated, rows_sharding

    repl = replicated(mesh)
    compiled = {}

    def jitted(batch):
        """(jitted step, batch shardings) for a batch's layout (arrays or jax.ShapeDtypeStruct)."""
        key = (jax.tree.structure(batch), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(batch)))
        if key not in compiled:
            bsh = jax.tree.map(lambda x: rows_sharding(x.shape[0], len(x.shape), mesh, rules), batch)
            fn = jax.jit(functools.partial(_update, graphdef, optimizer=optimizer, lc=lc, prompt_len=prompt_len,
                                           group_size=group_size, temperature=temperature),
                         in_shardings=(param_sh, opt_sh, bsh), out_shardings=(param_sh, opt_sh, repl, repl),
                         donate_argnums=(0, 1))
            compiled[key] = (fn, bsh)
        return compiled[key]

    def step(params, opt_state, batch):
        fn, bsh = jitted(batch)
        return fn(params, opt_state, jax.tree.map(placed, batch, bsh))

    step.compiled, step.jitted = compiled, jitted
    return step


@functools.partial(jax.jit, static_argnames=("graphdef", "lc", "prompt_len", "temperature"))
def probe_divergence(graphdef, params, batch, *, lc, prompt_len, temperature):
    """Exact token-mean divergence D_f(teacher || student) (full vocabulary, kind from `lc`) on a
    fixed batch: tokens [B, P+N], prompt_mask [B, P], mask [B, N], teacher logits [B, N, V]. -> scalar."""
    model = nnx.merge(graphdef, params)
    tokens, mask = batch["tokens"], batch["mask"]
    h = model.completion_hidden(tokens, jnp.concatenate([batch["prompt_mask"], mask], 1), prompt_len)
    loss, _ = L.chunked_divergence_loss(h, model.output_matrix(), mask, teacher_logits=batch["teacher"],
                                        temperature=temperature, kind=lc.kind, beta=lc.beta, alpha=lc.alpha_div,
                                        normalize="token", seq_chunk=lc.seq_chunk)
    return loss
