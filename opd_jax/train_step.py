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
from opd_jax.models.transformer import activation_layout

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


def policy_loss(model, b, lc, prompt_len: int, group_size: int, temperature: float, layout=None):
    """(loss, metrics) of one batch under the loss config `lc`. `layout(x, logical_axes)` (optional,
    on a mesh) pins the hidden states' rows to the batch axes and gathers the output matrix's width
    (FSDP), so the [rows, chunk, V] logits are formed per row shard, never for the whole batch."""
    tokens, mask = b["tokens"], b["mask"]
    full_mask = jnp.concatenate([b["prompt_mask"], mask], axis=1)
    h = model.completion_hidden(tokens, full_mask, prompt_len)
    w = model.output_matrix()
    if layout is not None:
        h, w = layout(h, ("batch", None, None)), layout(w, (None, "vocab"))
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


def check_micro_batch(micro: int, rows: dict, lc, group_size: int):
    """Clear errors for a `train.micro_batch` that cannot split the step's rows exactly.
    rows: part ("on" / "off") -> rows per step."""
    if micro < 0:
        raise OpdError(f"train.micro_batch must be >= 0 (0 = all rows at once), got {micro}")
    if not micro or all(micro >= r for r in rows.values()):
        return
    for part, r in rows.items():
        if micro < r and r % micro:
            raise OpdError(f"train.micro_batch={micro} does not divide the {r} {part}-policy rows per step")
    if "on" in rows and micro < rows["on"] and micro % group_size:
        raise OpdError(f"train.micro_batch={micro} must be a multiple of data.group_size={group_size} "
                       "(a prompt's samples stay in one micro-batch)")
    if lc.baseline == "loo":
        raise OpdError("loss.baseline=loo averages over the whole batch, so it cannot be split: "
                       "set train.micro_batch=0 or loss.baseline=none")


def _micro_weights(mask, normalize: str):
    """Share of the whole batch's normaliser held by each micro-batch, mask [n, micro, N] -> [n]:
    tokens (normalize="token") or rows with a token ("sequence"), so sum_i w_i L_i = L exactly."""
    m = mask.astype(jnp.float32)
    per = jnp.sum(m, (1, 2)) if normalize == "token" else jnp.sum((jnp.sum(m, 2) > 0).astype(jnp.float32), 1)
    return per / jnp.maximum(jnp.sum(per), 1.0)


def part_value_and_grad(graphdef, params, b, *, lc, prompt_len, group_size, temperature, micro=0, layout=None):
    """((loss, metrics), grads) of one batch, optionally in micro-batches of `micro` rows.

    With micro-batches, a `lax.scan` runs forward + backward per micro-batch and accumulates
    grads = sum_i w_i grad L_i (w from `_micro_weights`), equal to the whole batch's gradient; scalar
    metrics are the same weighted means ("tokens" is summed), per-row metrics are concatenated.
    `layout(x, logical_axes)` (optional, on a mesh; `sharding.layout_fn`) keeps rows on the batch mesh
    axes: in every layer, in the loss, and within each micro-batch."""

    def loss_of(p, bb):
        with activation_layout(layout):
            return policy_loss(nnx.merge(graphdef, p), bb, lc, prompt_len, group_size, temperature, layout)

    rows = b["tokens"].shape[0]
    if not micro or micro >= rows:
        return jax.value_and_grad(loss_of, has_aux=True)(params, b)
    n = rows // micro
    mbs = jax.tree.map(lambda x: x.reshape((n, micro) + x.shape[1:]), b)
    if layout is not None:  # [n, micro, ...]: each micro-batch's rows over the batch axes
        mbs = jax.tree.map(lambda x: layout(x, (None, "batch") + (None,) * (x.ndim - 2)), mbs)
    w = _micro_weights(mbs["mask"], lc.normalize)

    def body(acc, xs):
        bb, wi = xs
        (loss, m), g = jax.value_and_grad(loss_of, has_aux=True)(params, bb)
        acc = jax.tree.map(lambda a, x: a + wi * x.astype(jnp.float32), acc, g)
        return acc, (loss, m)

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    acc, (losses, ms) = jax.lax.scan(body, zeros, (mbs, w))
    grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
    metrics = {}
    for k, v in ms.items():
        if k == "row_divergence":
            metrics[k] = v.reshape(rows)
        elif k == "tokens":
            metrics[k] = jnp.sum(v)
        else:
            metrics[k] = jnp.tensordot(w, v.astype(jnp.float32), 1)
    return (jnp.dot(w, losses), metrics), grads


def _update(graphdef, params, opt_state, batch, *, optimizer, lc, prompt_len, group_size, temperature, micro=0,
            layout=None):
    """One optax update. params: pure dict of the student's parameters. -> (params, opt_state, loss, metrics).
    GKD: grads = lam * grad L(on) + (1 - lam) * grad L(off), each part possibly in micro-batches."""
    kw = dict(lc=lc, prompt_len=prompt_len, group_size=group_size, temperature=temperature, micro=micro,
              layout=layout)
    parts = {k: part_value_and_grad(graphdef, params, batch[k], **kw) for k in ("on", "off") if k in batch}
    if len(parts) == 2:
        loss, metrics = L.gkd_loss(parts["on"][0], parts["off"][0], lc.lam)
        grads = jax.tree.map(lambda a, b: lc.lam * a + (1.0 - lc.lam) * b, parts["on"][1], parts["off"][1])
    else:
        (key, ((loss, m), grads)), = parts.items()
        metrics = {f"{'on' if key == 'on' else 'off'}_policy/{k}": v for k, v in m.items()}
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["loss"] = loss
    return params, opt_state, loss, metrics


# Shardings follow the (committed) inputs; the trainer uses `sharded_train_step` instead.
train_step = jax.jit(_update, static_argnames=("graphdef", "optimizer", "lc", "prompt_len", "group_size", "temperature",
                                             "micro", "layout"), donate_argnums=(1, 2))


def sharded_train_step(graphdef, *, optimizer, lc, prompt_len: int, group_size: int, temperature: float, mesh,
                       param_sh, opt_sh, rules=None, micro: int = 0):
    """`_update` under `jax.jit` with explicit shardings at the boundary: params and optimizer state
    in and out as `param_sh` / `opt_sh` (donated), every batch array's rows over the batch mesh axes,
    loss and metrics replicated. One executable per batch layout (the trainer has one).
    Returns step(params, opt_state, batch) -> (params, opt_state, loss, metrics)."""
    from opd_jax.sharding import layout_fn, placed, replicated, rows_sharding

    repl = replicated(mesh)
    layout = layout_fn(mesh, rules)
    compiled = {}

    def jitted(batch):
        """(jitted step, batch shardings) for a batch's layout (arrays or jax.ShapeDtypeStruct)."""
        key = (jax.tree.structure(batch), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(batch)))
        if key not in compiled:
            bsh = jax.tree.map(lambda x: rows_sharding(x.shape[0], len(x.shape), mesh, rules), batch)
            fn = jax.jit(functools.partial(_update, graphdef, optimizer=optimizer, lc=lc, prompt_len=prompt_len,
                                           group_size=group_size, temperature=temperature, micro=micro,
                                           layout=layout),
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
