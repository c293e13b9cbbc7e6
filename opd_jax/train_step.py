"""The jitted student update: recompute the student on the rollout, take the configured loss, step optax.

A batch is a dict of arrays, grouped by domain, with
  tokens [B, P+N], prompt_mask [B, P], mask [B, N] (1 on generated tokens incl. EOS),
  sampler_logprobs [B, N], rewards [B], and the teachers' outputs at the completion positions:
  "full" / "topk": teacher = {name: [rows routed to it, N, D_t] final hidden states}, with the
  teachers' output matrices `teacher_w` = {name: [D_t, V]} given beside the batch, so the loss forms
  logits chunk by chunk and no [B, N, V] array exists; "sampled": teacher = [B, N] log-probs.
  Rows are grouped by domain: `routes[i]` names the teacher of the i-th block of B / len(routes) rows.
GKD: `on` is such a batch from the student's samples, `off` the same from dataset answers; the
loss is lam * L(on) + (1 - lam) * L(off) and either may be absent when lam is 1 or 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from opd_jax import losses as L
from opd_jax.errors import OpdError
from opd_jax.models.transformer import activation_layout

ESTIMATOR_TYPES = ("full", "sampled", "topk")
HIDDEN_MODES = ("full", "topk")  # the teachers hand over hidden states; the loss applies their output matrices


def uses_rl(lc) -> bool:
    return lc.rl_alpha < 1.0 or lc.rl_mode == "replace"


def teacher_output_kind(lc) -> str:
    """What the teachers must return for this loss config."""
    return "hidden" if lc.estimator_type in HIDDEN_MODES else "logprobs"


def check_loss_config(lc):
    if lc.estimator_type not in ESTIMATOR_TYPES:
        raise OpdError(f"loss.estimator_type must be one of {ESTIMATOR_TYPES}, got {lc.estimator_type!r}")
    if uses_rl(lc) and lc.estimator_type != "sampled":
        raise OpdError("RL + OPD (loss.rl_alpha < 1 or rl_mode=replace) needs loss.estimator_type=sampled")
    if not 0.0 <= lc.lam <= 1.0:
        raise OpdError(f"loss.lam must be in [0, 1], got {lc.lam}")
    L.get_fdiv(lc.kind, beta=lc.beta, alpha=lc.alpha_div)


def policy_loss(model, b, lc, prompt_len: int, group_size: int, temperature: float, layout=None, teacher_w=None):
    """(loss, metrics) of one batch under the loss config `lc`. `layout(x, logical_axes)` (optional,
    on a mesh) pins the hidden states' rows to the batch axes and gathers the output matrix's width
    (FSDP), so the [rows, chunk, V] logits are formed per row shard, never for the whole batch.
    "full" / "topk": b["teacher"] is the one teacher's hidden states [B, N, D_t] and `teacher_w` its
    output matrix [D_t, V] (without `teacher_w`: full-vocabulary logits [B, N, V], or top-k
    (log-probs, ids) [B, N, k], for small models and hand-built batches)."""
    tokens, mask = b["tokens"], b["mask"]
    full_mask = jnp.concatenate([b["prompt_mask"], mask], axis=1)
    h = model.completion_hidden(tokens, full_mask, prompt_len)
    w = model.output_matrix()
    th = b["teacher"]
    if layout is not None:
        h, w = layout(h, ("batch", None, None)), layout(w, (None, "vocab"))
        if teacher_w is not None:
            th, teacher_w = layout(th, ("batch", None, None)), layout(teacher_w, (None, "vocab"))
    comp = tokens[:, prompt_len:]
    slp = L.chunked_token_logprobs(h, w, comp, temperature=temperature, seq_chunk=lc.seq_chunk)
    div = dict(kind=lc.kind, beta=lc.beta, alpha=lc.alpha_div)
    if lc.estimator_type == "full":
        teacher = dict(teacher_hidden=th, teacher_w=teacher_w) if teacher_w is not None else dict(teacher_logits=th)
        loss, m = L.chunked_divergence_loss(h, w, mask, temperature=temperature, normalize=lc.normalize,
                                            seq_chunk=lc.seq_chunk, **teacher, **div)
    elif lc.estimator_type == "topk" and teacher_w is not None:
        loss, m = L.chunked_topk_loss(h, w, th, teacher_w, mask, lc.topk, temperature=temperature,
                                      normalize=lc.normalize, seq_chunk=lc.seq_chunk, **div)
    elif lc.estimator_type == "topk":
        logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
        loss, m = L.topk_distill_loss(logits, th[0], th[1], mask, temperature=temperature,
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


def teacher_groups(routes: tuple, rows: int) -> dict[str, list[int]]:
    """Teacher name -> its row indices, for a batch of `rows` rows in len(routes) equal domain blocks."""
    r = rows // len(routes)
    return {n: [i for d, m in enumerate(routes) if m == n for i in range(d * r, (d + 1) * r)]
            for n in sorted(set(routes))}


def check_micro_batch(micro: int, rows: dict, lc, group_size: int, routes: tuple = ()):
    """Clear errors for a `train.micro_batch` that cannot split the step's rows exactly.
    rows: part ("on" / "off") -> rows per step. In the hidden-state modes each teacher's rows are a
    separate forward/backward (its own output matrix), so `micro` must also divide those."""
    if micro < 0:
        raise OpdError(f"train.micro_batch must be >= 0 (0 = all rows at once), got {micro}")
    if not micro or all(micro >= r for r in rows.values()):
        return
    for part, r in rows.items():
        if micro < r and r % micro:
            raise OpdError(f"train.micro_batch={micro} does not divide the {r} {part}-policy rows per step")
        if lc.estimator_type in HIDDEN_MODES and len(set(routes)) > 1:
            for name, idx in teacher_groups(routes, r).items():
                if micro < len(idx) and len(idx) % micro:
                    raise OpdError(f"train.micro_batch={micro} does not divide the {len(idx)} {part}-policy rows "
                                   f"routed to teacher {name!r}")
    if "on" in rows and micro < rows["on"] and micro % group_size:
        raise OpdError(f"train.micro_batch={micro} must be a multiple of data.group_size={group_size} "
                       "(a prompt's samples stay in one micro-batch)")
    if lc.baseline == "loo":
        raise OpdError("loss.baseline=loo averages over the whole batch, so it cannot be split: "
                       "set train.micro_batch=0 or loss.baseline=none")


def _normaliser(mask, normalize: str):
    """What the loss divides by, mask [..., rows, N] -> [...]: tokens (normalize="token") or rows with a token."""
    m = mask.astype(jnp.float32)
    return jnp.sum(m, (-2, -1)) if normalize == "token" else jnp.sum((jnp.sum(m, -1) > 0).astype(jnp.float32), -1)


def _shares(counts):
    """Each part's share of the whole normaliser, so sum_i w_i L_i = L exactly."""
    return counts / jnp.maximum(jnp.sum(counts), 1.0)


def _combine(w, losses, ms: dict, row_divergence):
    """Weighted loss and metrics of parts (micro-batches or teacher groups): losses [n], ms: name ->
    [n] per-part scalars; "tokens" is summed, the rest are w-weighted means."""
    metrics = {k: jnp.sum(v) if k == "tokens" else jnp.tensordot(w, v.astype(jnp.float32), 1) for k, v in ms.items()}
    metrics["row_divergence"] = row_divergence
    return jnp.dot(w, losses), metrics


def _take_rows(x, idx: list[int]):
    """Rows `idx` (a union of contiguous domain blocks) of x, by static slices."""
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            runs.append(x[start:a + 1])
            start = b
    return runs[0] if len(runs) == 1 else jnp.concatenate(runs)


def part_value_and_grad(graphdef, params, b, *, lc, prompt_len, group_size, temperature, micro=0, layout=None,
                        teacher_w=None, routes=()):
    """((loss, metrics), grads) of one batch (one GKD part).

    Hidden-state modes (`teacher_w` = {name: [D_t, V]}, b["teacher"] = {name: hidden}): the rows of
    each teacher (`teacher_groups(routes)`) go through their own forward/backward against that
    teacher's output matrix, and grads = sum_g w_g grad L_g with w_g the group's share of the
    normaliser (per-row metrics put back in row order). Each group, or the whole batch, may be cut
    into micro-batches (`micro_value_and_grad`)."""
    kw = dict(lc=lc, prompt_len=prompt_len, group_size=group_size, temperature=temperature, micro=micro,
              layout=layout)
    if teacher_w is None:
        return micro_value_and_grad(graphdef, params, b, **kw)
    groups = teacher_groups(routes, b["tokens"].shape[0])
    if len(groups) == 1:
        (name,) = groups
        return micro_value_and_grad(graphdef, params, {**b, "teacher": b["teacher"][name]},
                                    teacher_w=teacher_w[name], **kw)
    outs, counts = [], []
    for name, idx in groups.items():
        sub = {k: _take_rows(v, idx) for k, v in b.items() if k != "teacher"}
        outs.append(micro_value_and_grad(graphdef, params, {**sub, "teacher": b["teacher"][name]},
                                         teacher_w=teacher_w[name], **kw))
        counts.append(_normaliser(sub["mask"], lc.normalize))
    w = _shares(jnp.stack(counts))
    order = np.argsort(np.concatenate([idx for idx in groups.values()]))
    ms = {k: jnp.stack([m[k] for (_, m), _ in outs]) for k in outs[0][0][1] if k != "row_divergence"}
    row_div = jnp.concatenate([m["row_divergence"] for (_, m), _ in outs])[order]
    loss, metrics = _combine(w, jnp.stack([loss for (loss, _), _ in outs]), ms, row_div)
    grads = jax.tree.map(lambda *g: sum(wi * gi.astype(jnp.float32) for wi, gi in zip(w, g)).astype(g[0].dtype),
                         *[g for _, g in outs])
    return (loss, metrics), grads


def micro_value_and_grad(graphdef, params, b, *, lc, prompt_len, group_size, temperature, micro=0, layout=None,
                         teacher_w=None):
    """((loss, metrics), grads) of one batch against one teacher, optionally in micro-batches of `micro` rows.

    With micro-batches, a `lax.scan` runs forward + backward per micro-batch and accumulates
    grads = sum_i w_i grad L_i (w: each micro-batch's share of the normaliser), equal to the whole
    batch's gradient; scalar metrics are the same weighted means ("tokens" is summed), per-row
    metrics are concatenated. `layout(x, logical_axes)` (optional, on a mesh; `sharding.layout_fn`)
    keeps rows on the batch mesh axes: in every layer, in the loss, and within each micro-batch."""

    def loss_of(p, bb):
        with activation_layout(layout):
            return policy_loss(nnx.merge(graphdef, p), bb, lc, prompt_len, group_size, temperature, layout,
                               teacher_w)

    rows = b["tokens"].shape[0]
    if not micro or micro >= rows:
        return jax.value_and_grad(loss_of, has_aux=True)(params, b)
    n = rows // micro
    mbs = jax.tree.map(lambda x: x.reshape((n, micro) + x.shape[1:]), b)
    if layout is not None:  # [n, micro, ...]: each micro-batch's rows over the batch axes
        mbs = jax.tree.map(lambda x: layout(x, (None, "batch") + (None,) * (x.ndim - 2)), mbs)
    w = _shares(_normaliser(mbs["mask"], lc.normalize))

    def body(acc, xs):
        bb, wi = xs
        (loss, m), g = jax.value_and_grad(loss_of, has_aux=True)(params, bb)
        acc = jax.tree.map(lambda a, x: a + wi * x.astype(jnp.float32), acc, g)
        return acc, (loss, m)

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    acc, (losses, ms) = jax.lax.scan(body, zeros, (mbs, w))
    grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
    row_div = ms.pop("row_divergence").reshape(rows)
    return _combine(w, losses, ms, row_div), grads


def _update(graphdef, params, opt_state, batch, teacher_w=None, *, optimizer, lc, prompt_len, group_size,
            temperature, micro=0, layout=None, routes=()):
    """One optax update. params: pure dict of the student's parameters; teacher_w: name -> output
    matrix (hidden-state modes). -> (params, opt_state, loss, metrics).
    GKD: grads = lam * grad L(on) + (1 - lam) * grad L(off), each part possibly in micro-batches."""
    kw = dict(lc=lc, prompt_len=prompt_len, group_size=group_size, temperature=temperature, micro=micro,
              layout=layout, teacher_w=teacher_w, routes=routes)
    parts = {k: part_value_and_grad(graphdef, params, batch[k], **kw) for k in ("on", "off") if k in batch}
    if len(parts) == 2:
        loss, metrics = L.gkd_loss(parts["on"][0], parts["off"][0], lc.lam)
        grads = jax.tree.map(lambda a, b: lc.lam * a + (1.0 - lc.lam) * b, parts["on"][1], parts["off"][1])
    else:
        (key, ((loss, m), grads)), = parts.items()
        metrics = {f"{'on' if key == 'on' else 'off'}_policy/{k}": v for k, v in m.items()}
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["loss"] = loss
    # a non-finite loss or gradient skips the update on device (no host round-trip): parameters and
    # optimizer state stay as they were, and the step is flagged for the trainer to count
    ok = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state), loss, metrics


_STATIC = ("graphdef", "optimizer", "lc", "prompt_len", "group_size", "temperature", "micro", "layout", "routes")
# Shardings follow the (committed) inputs; the trainer uses `sharded_train_step` instead.
train_step = jax.jit(_update, static_argnames=_STATIC, donate_argnums=(1, 2))


def sharded_train_step(graphdef, *, optimizer, lc, prompt_len: int, group_size: int, temperature: float, mesh,
                       param_sh, opt_sh, rules=None, micro: int = 0, routes: tuple = ()):
    """`_update` under `jax.jit` with explicit shardings at the boundary: params and optimizer state
    in and out as `param_sh` / `opt_sh` (donated), every batch array's rows over the batch mesh axes,
    the teachers' output matrices as they are placed, loss and metrics replicated. One executable per
    batch layout (the trainer has one).
    Returns step(params, opt_state, batch, teacher_w=None) -> (params, opt_state, loss, metrics)."""
    from opd_jax.sharding import layout_fn, placed, replicated, rows_sharding

    repl = replicated(mesh)
    layout = layout_fn(mesh, rules)
    compiled = {}

    def jitted(batch, teacher_w=None):
        """(jitted step, batch shardings) for a batch's layout (arrays or jax.ShapeDtypeStruct; the
        output matrices carry their shardings)."""
        tw_sh = jax.tree.map(lambda x: x.sharding, teacher_w)
        key = (jax.tree.structure(batch), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(batch)),
               jax.tree.structure(teacher_w), tuple(jax.tree.leaves(tw_sh)))
        if key not in compiled:
            bsh = jax.tree.map(lambda x: rows_sharding(x.shape[0], len(x.shape), mesh, rules), batch)
            fn = jax.jit(functools.partial(_update, graphdef, optimizer=optimizer, lc=lc, prompt_len=prompt_len,
                                           group_size=group_size, temperature=temperature, micro=micro,
                                           layout=layout, routes=routes),
                         in_shardings=(param_sh, opt_sh, bsh, tw_sh), out_shardings=(param_sh, opt_sh, repl, repl),
                         donate_argnums=(0, 1))
            compiled[key] = (fn, bsh)
        return compiled[key]

    def step(params, opt_state, batch, teacher_w=None):
        fn, bsh = jitted(batch, teacher_w)
        return fn(params, opt_state, jax.tree.map(placed, batch, bsh), teacher_w)

    step.compiled, step.jitted = compiled, jitted
    return step


@functools.partial(jax.jit, static_argnames=("graphdef", "lc", "prompt_len", "temperature", "routes"))
def probe_divergence(graphdef, params, batch, teacher_w, *, lc, prompt_len, temperature, routes):
    """Exact token-mean divergence D_f(teacher || student) (full vocabulary, kind from `lc`) on a
    fixed batch: tokens [B, P+N], prompt_mask [B, P], mask [B, N], teacher {name: hidden [rows, N, D_t]}
    routed by `routes` as in the step, teacher_w {name: [D_t, V]}. -> scalar."""
    model = nnx.merge(graphdef, params)
    tokens, mask = batch["tokens"], batch["mask"]
    h = model.completion_hidden(tokens, jnp.concatenate([batch["prompt_mask"], mask], 1), prompt_len)
    total = 0.0
    for name, idx in teacher_groups(routes, tokens.shape[0]).items():
        d, _ = L.chunked_divergence(_take_rows(h, idx), model.output_matrix(), lc.kind,
                                    teacher_hidden=batch["teacher"][name], teacher_w=teacher_w[name],
                                    temperature=temperature, beta=lc.beta, alpha=lc.alpha_div, seq_chunk=lc.seq_chunk)
        total = total + jnp.sum(L.clean(d, _take_rows(mask, idx)))
    return total / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
