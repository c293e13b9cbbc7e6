"""The update: `update(state, batch) -> (state, metrics)`, pure and jitted.

It recomputes the student on the rollout, takes the configured estimator's loss
(`opd_jax.losses.registry`) and steps optax. The batch is {"on": Part, "off": Part} (`opd_jax.batch`
gives the parts' arrays and shapes); for hidden-state estimators the teachers' output matrices
`teacher_w` = {name: [D_t, V]} come beside the batch.
Everything static about the update is one hashable `StepSpec`; the state is one `TrainState`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from opd_jax import losses as L
from opd_jax.layout import row_groups
from opd_jax.lora import join, split, trainable
from opd_jax.losses.registry import estimator_for
from opd_jax.models.transformer import activation_layout, unrolling

TRACES = {"update": 0}  # times the update was traced (= compiled programs; tests count them)


class TrainState(NamedTuple):
    """Everything a run carries from step to step, and exactly what a checkpoint holds.
    params / opt_state: the student's pure-dict parameters and optax state; step: updates taken;
    rng: the run's base key data (uint32; step s samples with fold_in(key, s)); data_position: prompt
    batches consumed (batch s of the prompt source is read at position s); horizon: the progressive
    horizon's state (`horizon.ProgressiveHorizon`: float32 [1 + 2w]; [0.] when the schedule is not
    progressive; None in hand-built states), which the update passes through unchanged."""

    params: dict
    opt_state: object
    step: jax.Array
    rng: jax.Array
    data_position: jax.Array
    horizon: jax.Array | None = None

    def key(self):
        return jax.random.wrap_key_data(self.rng)


def state_shardings(optimizer, params, param_sh, mesh) -> TrainState:
    """The TrainState's shardings: params as `param_sh`, optimizer state like its parameters, the
    scalars replicated."""
    from opd_jax import sharding as shd

    repl = shd.replicated(mesh)
    opt_sh = shd.opt_state_shardings(optimizer, trainable(params), trainable(param_sh), mesh)  # LoRA: adapters' only
    return TrainState(param_sh, opt_sh, repl, repl, repl, repl)


def new_state(params, opt_state, key, horizon=None) -> TrainState:
    """The state at step 0 (step, rng, data position and horizon state as host numpy values); horizon:
    the progressive schedule's initial state (default [0.])."""
    return TrainState(params, opt_state, np.zeros((), np.int32), np.asarray(jax.random.key_data(key)),
                      np.zeros((), np.int32), np.zeros(1, np.float32) if horizon is None else np.asarray(horizon))


@dataclass(frozen=True)
class StepSpec:
    """What is static about a run's update (hashable: one compiled program per spec and batch layout).
    routes: the teacher of each domain's block of rows (`RowLayout.routes`; `groups` derives each
    teacher's rows from it); micro: rows per micro-batch (0 = all); max_update_ratio: skip an update
    that multiplies the parameters' norm by more (0 = off); layout(x, logical_axes) (optional, on a
    mesh) keeps rows on the batch mesh axes."""

    lc: object
    prompt_len: int
    group_size: int
    temperature: float
    routes: tuple = ()
    micro: int = 0
    max_update_ratio: float = 0.0
    layout: Callable | None = None
    is_cap: float = 0.0  # > 0: asynchronous, sampled-token / RL terms weighted by min(pi / pi_sampler, is_cap)
    handover: str = ""  # what the teachers hand over (losses.registry.handover); "": the estimator's own
    cross: tuple = ()  # the teachers that score in their own tokens: parts carry a loss_mask, teacher_w a map

    def groups(self, rows: int) -> dict:
        return row_groups(self.routes, rows)

    @classmethod
    def from_config(cls, cfg, routes: tuple, micro: int = 0, layout=None) -> "StepSpec":
        """Synchronous runs (train.max_staleness 0) never apply importance weights (is_cap 0)."""
        from opd_jax.losses.registry import handover, needs_teachers
        from opd_jax.xtok_teacher import xtok_names

        dc, teachers = cfg.data, needs_teachers(cfg.loss)
        used = set(routes)
        return cls(cfg.loss, dc.max_prompt_len, dc.group_size, dc.temperature, tuple(routes), micro,
                   cfg.train.max_update_ratio, layout, cfg.loss.is_cap if cfg.train.max_staleness else 0.0,
                   handover(cfg),
                   tuple(sorted(set(xtok_names(cfg)) & used)) if teachers else ())


def policy_loss(model, b, lc, prompt_len: int, group_size: int, temperature: float, layout=None, teacher=None,
                teacher_w=None, is_cap: float = 0.0, handover: str = "", cross: bool = False):
    """(loss, metrics) of one part against one teacher's hand-over `teacher` (its output matrix
    `teacher_w` in the hidden-state estimators; without it: full logits [B, N, V] or top-k
    (log-probs, ids), for small models and hand-built batches). `layout(x, logical_axes)` (optional,
    on a mesh) pins the hidden states' rows to the batch axes and gathers the output matrix's width
    (FSDP), so the [rows, chunk, V] logits are formed per row shard, never for the whole batch. b: a
    `batch.Part`; handover / cross: as `StepSpec` (cross: this teacher scores in its own tokens)."""
    if b.packed:  # whole sequences end to end: the hidden state at column j predicts token j + 1
        h = model.packed_hidden(b.tokens, b.segments)[:, :-1]
    else:
        h = model.completion_hidden(b.tokens, jnp.concatenate([b.prompt_mask, b.mask], axis=1), prompt_len)
    w = model.output_matrix()
    if layout is not None:
        h, w = layout(h, ("batch", None, None)), layout(w, (None, "vocab"))
        if teacher_w is not None:
            teacher = layout(teacher, ("batch", None, None))
            teacher_w = ({**teacher_w, "w": layout(teacher_w["w"], (None, "vocab"))} if cross
                         else layout(teacher_w, (None, "vocab")))
    if b.packed and lc.normalize == "sequence":  # the 1 / seq_tokens weights in loss_mask make it per sequence
        lc = dataclasses.replace(lc, normalize="token")
    mask = b.scored_mask  # a cross-tokenizer teacher covers only the positions aligned with its tokens
    real = b.mask if b.packed else mask  # a packed part's loss_mask may hold weights: metrics count tokens
    b = b._replace(mask=mask)
    loss, m = estimator_for(lc).loss(h, w, b, teacher, teacher_w, lc, group_size=group_size, temperature=temperature,
                                     is_cap=is_cap, handover=handover, cross=cross)
    slp = m.pop("token_logprob")
    if b.sampler_logprobs is not None and "logprob_mismatch" not in m:
        m["logprob_mismatch"] = L.masked_mean(jnp.abs(slp - b.sampler_logprobs), real)
    m["student_logprob"] = L.masked_mean(slp, real)
    per_tok = m.pop("per_token_divergence")
    if b.packed:  # per sequence [n]: its tokens' divergence over its token count (summable over micro-batches)
        n = b.seq_tokens.shape[0]
        real = real.astype(jnp.float32)
        m["tokens"] = jnp.sum(real)  # loss_mask may hold 1 / seq_tokens weights, not counts
        per_seq = jax.ops.segment_sum(jnp.ravel(L.clean(per_tok, real) * real), jnp.ravel(b.seq_index), n + 1)[:n]
        m["row_divergence"] = per_seq / jnp.maximum(b.seq_tokens, 1.0)
        return loss, m
    m["row_divergence"] = jnp.sum(L.clean(per_tok, mask), -1) / jnp.maximum(jnp.sum(mask, -1), 1)
    return loss, m


def _normaliser(mask, normalize: str):
    """What the loss divides by, mask [..., rows, N] -> [...]: tokens (normalize="token") or rows with a token."""
    m = mask.astype(jnp.float32)
    return jnp.sum(m, (-2, -1)) if normalize == "token" else jnp.sum((jnp.sum(m, -1) > 0).astype(jnp.float32), -1)


def _normalize(lc, b) -> str:
    """The normalisation a part's loss runs with: a packed part's per-sequence weights are in its loss_mask,
    so it always sums per token."""
    return "token" if b.packed else lc.normalize


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


def part_value_and_grad(graphdef, params, b, spec: StepSpec, teacher_w=None, frozen=None):
    """((loss, metrics), grads) of one batch part.

    Hidden-state estimators (`teacher_w` = {name: [D_t, V]}, b.teacher = {name: hidden}): the rows
    of each teacher (`spec.groups`) go through their own forward/backward against that teacher's
    output matrix, and grads = sum_g w_g grad L_g with w_g the group's share of the normaliser
    (per-row metrics put back in row order). Each group, or the whole batch, may be cut into
    micro-batches (`micro_value_and_grad`). frozen: parameters held fixed (LoRA's base, `opd_jax.lora`):
    the gradient is taken with respect to `params` alone."""
    if teacher_w is None:
        return micro_value_and_grad(graphdef, params, b, spec, frozen=frozen)
    groups = spec.groups(b.tokens.shape[0])
    if len(groups) == 1:
        (name,) = groups
        return micro_value_and_grad(graphdef, params, b._replace(teacher=b.teacher[name]), spec, teacher_w[name],
                                    cross=name in spec.cross, frozen=frozen)
    outs, counts = [], []
    for name, idx in groups.items():
        sub = b.rows(lambda x, idx=idx: _take_rows(x, idx))._replace(teacher=b.teacher[name])
        outs.append(micro_value_and_grad(graphdef, params, sub, spec, teacher_w[name], cross=name in spec.cross,
                                         frozen=frozen))
        counts.append(_normaliser(sub.scored_mask, _normalize(spec.lc, sub)))
    w = _shares(jnp.stack(counts))
    order = np.argsort(np.concatenate([idx for idx in groups.values()]))
    ms = {k: jnp.stack([m[k] for (_, m), _ in outs]) for k in outs[0][0][1]
          if k != "row_divergence" and all(k in m for (_, m), _ in outs)}  # teachers of both kinds: shared metrics
    if b.packed:  # per sequence over the whole part: each group's own sequences, zeros elsewhere
        row_div = sum(m["row_divergence"] for (_, m), _ in outs)
    else:
        row_div = jnp.concatenate([m["row_divergence"] for (_, m), _ in outs])[order]
    loss, metrics = _combine(w, jnp.stack([loss for (loss, _), _ in outs]), ms, row_div)
    grads = jax.tree.map(lambda *g: sum(wi * gi.astype(jnp.float32) for wi, gi in zip(w, g)).astype(g[0].dtype),
                         *[g for _, g in outs])
    return (loss, metrics), grads


def micro_value_and_grad(graphdef, params, b, spec: StepSpec, teacher_w=None, cross: bool = False, frozen=None):
    """((loss, metrics), grads) of one batch against one teacher, in micro-batches of `spec.micro` rows.

    With micro-batches, a `lax.scan` runs forward + backward per micro-batch and accumulates
    grads = sum_i w_i grad L_i (w: each micro-batch's share of the normaliser), equal to the whole
    batch's gradient; scalar metrics are the same weighted means ("tokens" is summed), per-row
    metrics are concatenated. `spec.layout` (on a mesh; `sharding.layout_fn`) keeps rows on the batch
    mesh axes: in every layer, in the loss, and within each micro-batch."""
    layout = spec.layout

    def loss_of(p, bb):
        with activation_layout(layout):
            return policy_loss(nnx.merge(graphdef, join(p, frozen)), bb, spec.lc, spec.prompt_len, spec.group_size,
                               spec.temperature, layout, bb.teacher, teacher_w, spec.is_cap, spec.handover, cross)

    rows, micro = b.tokens.shape[0], spec.micro
    if not micro or micro >= rows:
        return jax.value_and_grad(loss_of, has_aux=True)(params, b)
    n = rows // micro
    per_seq = {f: getattr(b, f) for f in b.per_sequence}  # a packed part's [n] arrays: every micro-batch reads all
    mbs = jax.tree.map(lambda x: x.reshape((n, micro) + x.shape[1:]), b._replace(**dict.fromkeys(per_seq)))
    if layout is not None:  # [n, micro, ...]: each micro-batch's rows over the batch axes
        mbs = jax.tree.map(lambda x: layout(x, (None, "batch") + (None,) * (x.ndim - 2)), mbs)
    w = _shares(_normaliser(mbs.scored_mask, _normalize(spec.lc, b)))

    def body(acc, xs):
        bb, wi = xs
        (loss, m), g = jax.value_and_grad(loss_of, has_aux=True)(params, bb._replace(**per_seq))
        acc = jax.tree.map(lambda a, x: a + wi * x.astype(jnp.float32), acc, g)
        return acc, (loss, m)

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    acc, (losses, ms) = jax.lax.scan(body, zeros, (mbs, w), unroll=n if unrolling() else 1)  # unrolled: FLOP counts
    grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
    row_div = ms.pop("row_divergence")
    row_div = row_div.sum(0) if b.packed else row_div.reshape(rows)  # packed: per-sequence partial sums
    return _combine(w, losses, ms, row_div), grads


def update(graphdef, optimizer, spec: StepSpec, state: TrainState, batch: dict, teacher_w=None):
    """One optax update -> (state, metrics). GKD: grads = lam * grad L(on) + (1 - lam) * grad L(off),
    each part possibly in micro-batches. metrics holds "loss", "grad_norm", "update_ratio" (the
    parameters' global norm after / before) and "skipped": a non-finite loss, gradient or update, or
    an update that multiplies the parameters' norm by more than `spec.max_update_ratio`, is skipped on
    device (no host round-trip): parameters and optimizer state stay as they were. step and
    data_position advance either way (the batch was consumed). With LoRA adapters (`opd_jax.lora`) all of
    this is of the adapters: the base passes through unchanged."""
    TRACES["update"] += 1
    lc = spec.lc
    params, frozen = split(state.params)  # LoRA: only the adapters are differentiated, optimised and guarded
    parts = {k: part_value_and_grad(graphdef, params, batch[k], spec, teacher_w, frozen) for k in ("on", "off")
             if k in batch}
    if len(parts) == 2:
        loss, metrics = L.gkd_loss(parts["on"][0], parts["off"][0], lc.lam)
        grads = jax.tree.map(lambda a, b: lc.lam * a + (1.0 - lc.lam) * b, parts["on"][1], parts["off"][1])
    else:
        (key, ((loss, m), grads)), = parts.items()
        metrics = {f"{key}_policy/{k}": v for k, v in m.items()}
    updates, new_opt_state = optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["loss"] = loss
    old_norm, new_norm = optax.tree.norm(params), optax.tree.norm(new_params)
    metrics["update_ratio"] = new_norm / jnp.maximum(old_norm, 1e-30)
    ok = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(new_norm)
    if spec.max_update_ratio:
        ok = ok & (new_norm <= spec.max_update_ratio * old_norm)
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    return TrainState(join(jax.tree.map(keep, new_params, params), frozen), jax.tree.map(keep, new_opt_state, state.opt_state),
                      state.step + 1, state.rng, state.data_position + 1, state.horizon), metrics


# Shardings follow the (committed) inputs; a run uses `compile_update` instead.
train_step = jax.jit(update, static_argnums=(0, 1, 2), donate_argnums=(3,))


def batch_shardings(batch, mesh, rules=None):
    """Every batch array's rows over the batch mesh axes (arrays or jax.ShapeDtypeStruct)."""
    from opd_jax.sharding import rows_sharding
    return jax.tree.map(lambda x: rows_sharding(x.shape[0], len(x.shape), mesh, rules), batch)


def compile_update(graphdef, optimizer, spec: StepSpec, state_sh: TrainState, abstract_state: TrainState, batch,
                   teacher_w=None, *, mesh, rules=None):
    """`update` compiled ahead of time with explicit shardings at the boundary: the state in and out as
    `state_sh` (donated), every batch array's rows over the batch mesh axes, the teachers' output
    matrices as placed (`teacher_w`: ShapeDtypeStructs with shardings), metrics replicated.
    batch: ShapeDtypeStructs. -> `UpdateProgram` (call it as step(state, batch, teacher_w))."""
    from opd_jax.sharding import replicated

    bsh = batch_shardings(batch, mesh, rules)
    tw_sh = jax.tree.map(lambda x: x.sharding, teacher_w)
    fn = jax.jit(functools.partial(update, graphdef, optimizer, spec), in_shardings=(state_sh, bsh, tw_sh),
                 out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sh)
    return UpdateProgram(fn.lower(abstract, batch, teacher_w).compile(), bsh, tw_sh)


@dataclass(frozen=True)
class UpdateProgram:
    """A compiled update, its batch shardings and the teachers' output-matrix shardings it expects;
    host or differently placed batch arrays are put on the batch shardings before the call."""

    compiled: object
    batch_sh: object
    teacher_w_sh: object = None

    def __call__(self, state, batch, teacher_w=None):
        from opd_jax.sharding import placed
        return self.compiled(state, jax.tree.map(placed, batch, self.batch_sh), teacher_w)

    def memory(self) -> dict:
        mem = self.compiled.memory_analysis()
        return {"activation_bytes_per_device": float(getattr(mem, "temp_size_in_bytes", 0) or 0),
                "compiled_argument_bytes_per_device": float(getattr(mem, "argument_size_in_bytes", 0) or 0)}

    def flops(self) -> float:
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float((cost or {}).get("flops", float("nan")))


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def probe_divergence(graphdef, params, batch, teacher_w, *, spec: StepSpec):
    """Exact token-mean divergence D_f(teacher || student) (full vocabulary, kind from `spec.lc`) on a
    fixed batch: a `batch.Part` with teacher {name: hidden [rows, N, D_t]} routed as in the update, teacher_w
    {name: [D_t, V]}. -> scalar."""
    lc = spec.lc
    model = nnx.merge(graphdef, params)
    tokens, mask = batch.tokens, batch.mask
    h = model.completion_hidden(tokens, jnp.concatenate([batch.prompt_mask, mask], 1), spec.prompt_len)
    total = 0.0
    for name, idx in spec.groups(tokens.shape[0]).items():
        d, _ = L.chunked_divergence(_take_rows(h, idx), model.output_matrix(), lc.kind,
                                    teacher_hidden=batch.teacher[name], teacher_w=teacher_w[name],
                                    temperature=spec.temperature, beta=lc.beta, alpha=lc.alpha_div,
                                    seq_chunk=lc.seq_chunk)
        total = total + jnp.sum(L.clean(d, _take_rows(mask, idx)))
    return total / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
