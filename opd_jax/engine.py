"""The rollout engine: a fixed number of decode slots that refill as sequences end.

Three jitted programs and a small host loop:

    prefill(params, ids [n, P], pmask [n, P]) -> store: the prompts' KV [n, L, P, K, Dh] and next-token
        logits [n, V]; one row per *prompt*: its G samples share it
    insert(slots, store, take [S], src [S], seq [S], cap [S]) -> slots: slot s (where take[s]) receives
        prompt src[s]'s KV and logits and starts sequence seq[s] with length cap cap[s]
    decode(params, slots) -> slots: up to `steps_per_call` decode steps over all S slots, in one
        dispatch (the host stays out of the loop); stops early once no slot is live

    host: prefill every prompt once; fill free slots from the queue of sequence ids; decode; read back
    which slots ended; hand their rows back; refill; until the queue is empty and no slot is live.

Slot layout: each slot's cache holds its prompt at [0, P) (left-padded) and its i-th new token at
P + i, so every slot has its own filled length; `valid [S, C]` marks the real keys and attention reads
only the shortest static length that covers every live slot (`attention.decode_attention`).

Randomness: token i of sequence q is drawn with fold_in(fold_in(key, q), i) (each slot carries its
sequence's base key fold_in(key, q), so slots may hold sequences of different keys: the asynchronous
pipeline's batches). A sequence's tokens
therefore depend only on its prompt, its id and the key: not on the slot that ran it, on when it
started, or on how many slots there are.

Rollout layout: the programs run on parameters placed with the rollout rules (`mesh.rollout_rules`,
default `sharding.ROLLOUT_RULES`: weights replicated over the batch axes, split over `tensor` only),
slots over the batch axes; a decode step then moves activations, not weights.

Occupancy = generated tokens / (slots x decode steps run): the share of slot-steps that produced a
token. A static batch is the engine with one slot per row (every row waits for the longest).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import distributed as dist
from opd_jax import sharding as shd
from opd_jax.errors import OpdError
from opd_jax.models.transformer import CACHE_AXES, activation_layout, init_cache, positions_from_mask
from opd_jax.sampling import Rollout, sample_rows

TRACES = {"prefill": 0, "insert": 0, "decode": 0, "whole": 0}


@dataclass(frozen=True)
class EngineSpec:
    """Everything static about a rollout: prompt length P, new tokens N (the longest a sequence may
    get), slots S, the sampling settings (temperature 0 = greedy), stop ids, the pad id and the decode
    steps per dispatch."""

    prompt_len: int
    max_new_tokens: int
    slots: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple = ()
    pad_id: int = 0
    steps_per_call: int = 8

    @classmethod
    def for_data(cls, dc, n_seq: int, temperature: float, *, stop=(), pad_id: int = 0,
                 steps_per_call: int | None = None) -> "EngineSpec":
        """The engine settings of a run's `data` config for `n_seq` sequences: data.rollout_slots slots
        (0 = one per sequence; at most n_seq); temperature 0 (greedy) drops top-k / top-p."""
        return cls(prompt_len=dc.max_prompt_len, max_new_tokens=dc.max_new_tokens,
                   slots=min(dc.rollout_slots or n_seq, n_seq), temperature=float(temperature),
                   top_k=dc.top_k if temperature else 0, top_p=dc.top_p if temperature else 1.0,
                   stop=tuple(sorted(stop)), pad_id=pad_id, steps_per_call=steps_per_call or dc.decode_steps_per_call)

    def check(self, context: int):
        if self.slots < 1:
            raise OpdError(f"rollout slots must be >= 1, got {self.slots}")
        if self.max_new_tokens < 1:
            raise OpdError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.steps_per_call < 1:
            raise OpdError(f"decode steps per call must be >= 1, got {self.steps_per_call}")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise OpdError(f"bad sampling settings: temperature={self.temperature}, top_k={self.top_k}, "
                           f"top_p={self.top_p}")
        total = self.prompt_len + self.max_new_tokens
        if total > context:
            raise OpdError(f"prompt length {self.prompt_len} + max_new_tokens {self.max_new_tokens} = {total} "
                           f"exceeds the model context {context}")
        return self


class Slots(NamedTuple):
    """The engine's device state. k, v [S, L, C, K, Dh] (C = P + N); valid [S, C] bool (real keys);
    pos [S] RoPE position of the next token; gen [S] tokens generated; seq [S] sequence id (-1: never
    used); live [S] bool; cap [S] length cap; logits [S, V] float32 next-token logits; tokens [S, N]
    int32 and logprobs [S, N] float32: the sequence so far; base [S, 2] uint32 the sequence's key data."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    pos: jax.Array
    gen: jax.Array
    seq: jax.Array
    live: jax.Array
    cap: jax.Array
    logits: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    base: jax.Array  # [S, 2] uint32: the key data of each slot's sequence (token i draws with fold_in(base, i))


SLOT_AXES = Slots(CACHE_AXES, CACHE_AXES, ("batch", None), ("batch",), ("batch",), ("batch",), ("batch",),
                  ("batch",), ("batch", None), ("batch", None), ("batch", None), ("batch", None))


@dataclass
class EngineStats:
    """decode_steps: steps run (each over every slot); generated: tokens produced; handed_back: the
    sequence ids in the order their rows were handed back; dispatches: decode calls; prefill_rows:
    prompts prefilled."""

    slots: int
    decode_steps: int = 0
    generated: int = 0
    dispatches: int = 0
    prefill_rows: int = 0
    handed_back: list = field(default_factory=list)
    queued_steps: int = 0  # decode steps of calls made while sequences were still waiting for a slot
    queued_generated: int = 0  # tokens those calls produced

    @property
    def occupancy(self) -> float:
        return self.generated / max(1, self.slots * self.decode_steps)

    @property
    def occupancy_while_queued(self) -> float:
        """Occupancy of the calls made while sequences waited for a slot: what refilling achieves; the
        rest is the drain at the end, when no sequence is left to start (bounded by the longest one)."""
        return self.queued_generated / max(1, self.slots * self.queued_steps)


# ----------------------------------------------------------------------------- the three programs


def _constrain(mesh, rules):
    """(put(x, logical_axes), layout) inside a program: `sharding.layout_fn` on a mesh; without one,
    put leaves x as it is and layout is None."""
    if mesh is None:
        return (lambda x, axes: x), None
    layout = shd.layout_fn(mesh, dict(rules) if rules is not None else None)
    return layout, layout


def empty_slots(cfg, spec: EngineSpec) -> Slots:
    """Slots that hold nothing (seq -1, not live)."""
    s, n = spec.slots, spec.max_new_tokens
    k, v = init_cache(cfg, s, spec.prompt_len + n)
    zi = jnp.zeros((s,), jnp.int32)
    return Slots(k, v, jnp.zeros((s, spec.prompt_len + n), bool), zi, zi, zi - 1, jnp.zeros((s,), bool), zi,
                 jnp.zeros((s, cfg.vocab_size), jnp.float32), jnp.full((s, n), spec.pad_id, jnp.int32),
                 jnp.zeros((s, n), jnp.float32),
                 jnp.zeros((s,) + jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape, jnp.uint32))


def sequence_keys(key, seq) -> np.ndarray:
    """Key data [n, 2] of sequences `seq` [n] under `key`: fold_in(key, q), the base every token of
    sequence q draws from (token i: fold_in(base, i))."""
    seq = jnp.asarray(np.asarray(seq, np.int32))
    key = jax.random.wrap_key_data(jnp.asarray(dist.to_host(jax.random.key_data(key))))  # a host copy
    return np.asarray(jax.random.key_data(jax.vmap(lambda q: jax.random.fold_in(key, q))(seq)))


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "mesh", "rules"))
def _empty(*, cfg, spec, mesh, rules):
    put, _ = _constrain(mesh, rules)
    return Slots(*(put(x, ax) for x, ax in zip(empty_slots(cfg, spec), SLOT_AXES)))


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "rules"))
def _prefill(graphdef, params, ids, pmask, *, mesh, rules):
    """-> (k, v [n, L, P, K, Dh], logits [n, V] float32, pmask [n, P])."""
    TRACES["prefill"] += 1
    return _prefill_body(nnx.merge(graphdef, params), ids, pmask, mesh, rules)


def _prefill_body(model, ids, pmask, mesh, rules):
    put, layout = _constrain(mesh, rules)
    n, p = ids.shape
    cache = tuple(put(c, CACHE_AXES) for c in init_cache(model.cfg, n, p))
    with activation_layout(layout):
        h, (k, v) = model.run(ids, positions_from_mask(pmask), jnp.arange(p), pmask.astype(bool), cache, 0)
    logits = model.logits(h[:, -1:])[:, 0]
    return put(k, CACHE_AXES), put(v, CACHE_AXES), logits, pmask


@functools.partial(jax.jit, static_argnames=("spec", "mesh", "rules"), donate_argnums=(0,))
def _insert(slots: Slots, store, take, src, seq, cap, base, *, spec, mesh, rules):
    """Slot s (where take[s]) starts sequence seq[s] (length cap cap[s], key data base[s] [S, 2]) from
    stored prompt src[s]."""
    TRACES["insert"] += 1
    put, _ = _constrain(mesh, rules)
    sk, sv, slog, spm = store
    p, n = spec.prompt_len, spec.max_new_tokens

    def prompt_kv(cache, stored):  # slot s's [0, P) <- stored prompt src[s] where take[s], row by row in place
        def one(row, j, t):
            head = jnp.where(t, stored[j], row[:, :p]).astype(row.dtype)
            return jax.lax.dynamic_update_slice(row, head, (0, 0, 0, 0))
        return put(jax.vmap(one)(cache, src, take), CACHE_AXES)

    pm = jnp.take(spm, src, axis=0).astype(bool)
    new = dict(valid=jnp.concatenate([pm, jnp.zeros((pm.shape[0], n), bool)], 1),
               pos=pm.sum(1).astype(jnp.int32), gen=jnp.zeros_like(src), seq=seq, live=jnp.ones_like(take),
               cap=cap, logits=jnp.take(slog, src, axis=0), tokens=jnp.full(slots.tokens.shape, spec.pad_id, jnp.int32),
               logprobs=jnp.zeros(slots.logprobs.shape, jnp.float32), base=base)

    def where_taken(name, x):  # the new value in taken slots, the old one elsewhere
        old = getattr(slots, name)
        return put(jnp.where(take.reshape((-1,) + (1,) * (x.ndim - 1)), x, old), getattr(SLOT_AXES, name))

    out = {name: where_taken(name, x) for name, x in new.items()}
    return slots._replace(k=prompt_kv(slots.k, sk), v=prompt_kv(slots.v, sv), **out)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "group", "mesh", "rules"))
def _whole(graphdef, params, ids, pmask, base, cap, *, spec, group, mesh, rules):
    """The whole rollout in one program when every sequence has its own slot (nothing to refill):
    prefill [n, P], copy each prompt's KV to its `group` rows, then decode all rows in lock step until
    every one has ended (at most N steps). Row q is sequence q: base [n * group, 2] its key data, cap
    [n * group] its length cap. Every live row is at the same step i, so the cache write, the
    attention length and the keys each row sees are the ones the slot loop gives it: the same tokens.
    -> (tokens [n * group, P + N], logprobs [n * group, N], mask [n * group, N], steps run)."""
    TRACES["whole"] += 1
    put, layout = _constrain(mesh, rules)
    model = nnx.merge(graphdef, params)
    p, n = spec.prompt_len, spec.max_new_tokens
    k, v, logits, _ = _prefill_body(model, ids, pmask, mesh, rules)
    rows = lambda x: jnp.repeat(x, group, axis=0) if group > 1 else x  # noqa: E731
    grow = lambda c: jnp.pad(rows(c), ((0, 0), (0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731  [R, L, P+N, K, Dh]
    k, v, logits, pm = put(grow(k), CACHE_AXES), put(grow(v), CACHE_AXES), rows(logits), rows(pmask)
    r = pm.shape[0]
    stop = jnp.asarray(spec.stop or (-1,), jnp.int32)
    start = dict(i=jnp.int32(0), k=k, v=v, valid=jnp.concatenate([pm.astype(bool), jnp.zeros((r, n), bool)], 1),
                 live=jnp.ones((r,), bool), gen=jnp.zeros((r,), jnp.int32), logits=logits,
                 tokens=jnp.full((r, n), spec.pad_id, jnp.int32), logprobs=jnp.zeros((r, n), jnp.float32))
    pos0 = pm.sum(1).astype(jnp.int32)
    layers = model.split_layers()  # once, outside the loop

    def body(c):
        i, live = c["i"], c["live"]
        keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.wrap_key_data(b), i))(base)
        tok, lp = sample_rows(c["logits"], keys, spec.temperature, spec.top_k, spec.top_p)
        tok = jnp.where(live, tok, spec.pad_id)
        col = lambda buf, x, at: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, at))  # noqa: E731
        ended = live & ((jnp.isin(tok, stop) if spec.stop else False) | (i + 1 >= cap))
        valid = col(c["valid"], live, p + i)
        with activation_layout(layout):
            h, (k, v) = model.run(tok[:, None], (pos0 + i)[:, None], (p + i)[None], valid, (c["k"], c["v"]), p + i,
                                  layers=layers)
        return dict(i=i + 1, k=put(k, CACHE_AXES), v=put(v, CACHE_AXES), valid=valid, live=live & ~ended,
                    gen=c["gen"] + live.astype(jnp.int32), logits=model.logits(h)[:, 0],
                    tokens=col(c["tokens"], tok, i), logprobs=col(c["logprobs"], jnp.where(live, lp, 0.0), i))

    out = jax.lax.while_loop(lambda c: (c["i"] < n) & jnp.any(c["live"]), body, start)
    mask = (jnp.arange(n)[None] < out["gen"][:, None]).astype(jnp.int32)
    tokens = jnp.concatenate([rows(ids), out["tokens"]], 1)
    return put(tokens, ("batch", None)), put(out["logprobs"], ("batch", None)), put(mask, ("batch", None)), out["i"]


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "mesh", "rules"), donate_argnums=(2,))
def _decode(graphdef, params, slots: Slots, *, spec, mesh, rules):
    """Up to spec.steps_per_call decode steps over all slots -> (slots, steps run)."""
    TRACES["decode"] += 1
    put, layout = _constrain(mesh, rules)
    model = nnx.merge(graphdef, params)
    p, n = spec.prompt_len, spec.max_new_tokens
    c = p + n
    stop = jnp.asarray(spec.stop or (-1,), jnp.int32)
    layers = model.split_layers()  # once, outside the loop

    def cond(carry):
        i, s = carry
        return (i < spec.steps_per_call) & jnp.any(s.live)

    def body(carry):
        i, s = carry
        keys = jax.vmap(lambda b, g: jax.random.fold_in(jax.random.wrap_key_data(b), g))(s.base, s.gen)
        tok, lp = sample_rows(s.logits, keys, spec.temperature, spec.top_k, spec.top_p)
        live = s.live
        tok = jnp.where(live, tok, spec.pad_id)
        at = jnp.minimum(s.gen, n - 1)  # an ended slot rewrites what it holds there
        tokens = _set_rows(s.tokens, at, tok, live)
        logprobs = _set_rows(s.logprobs, at, lp, live)
        ended = live & ((jnp.isin(tok, stop) if spec.stop else False) | (s.gen + 1 >= s.cap))
        w = jnp.minimum(p + s.gen, c - 1)  # this token's cache slot
        valid = _set_rows(s.valid, w, jnp.ones_like(live), live)
        reach = jnp.max(jnp.where(live, w, 0))[None]  # attention reads up to the furthest live slot
        with activation_layout(layout):
            h, (k, v) = model.run(tok[:, None], s.pos[:, None], reach, valid, (s.k, s.v), w, layers=layers)
        step = live.astype(jnp.int32)
        s = Slots(put(k, CACHE_AXES), put(v, CACHE_AXES), valid, s.pos + step, s.gen + step, s.seq,
                  live & ~ended, s.cap, model.logits(h)[:, 0], tokens, logprobs, s.base)
        return i + 1, Slots(*(put(x, ax) for x, ax in zip(s, SLOT_AXES)))

    steps, slots = jax.lax.while_loop(cond, body, (jnp.int32(0), slots))
    return slots, steps


def _set_rows(buf, at, values, where):
    """buf [S, M] with buf[s, at[s]] = values[s] where `where[s]` (else unchanged): a per-row update
    (vmap of dynamic_update_slice), partitioned row by row with no collective."""
    def one(row, j, x, w):
        return jax.lax.dynamic_update_slice(row, jnp.where(w, x, row[j]).astype(row.dtype)[None], (j,))
    return jax.vmap(one)(buf, at, values, where)


@jax.jit
def _gather(tokens, logprobs, idx):
    return jnp.take(tokens, idx, axis=0), jnp.take(logprobs, idx, axis=0)


# ----------------------------------------------------------------------------- the host loop


@dataclass(frozen=True)
class Engine:
    """Runs rollouts of one `EngineSpec` for a student (graphdef, ModelConfig); `mesh` + `rules` (the rollout rules)
    place the weights and the slots. `run` is the whole rollout; the programs are module functions."""

    graphdef: object
    model_cfg: object  # the student's ModelConfig
    spec: EngineSpec
    mesh: object = None
    rules: dict | None = None

    def __post_init__(self):
        self.spec.check(self.model_cfg.max_position_embeddings)

    def _static(self):
        rules = None if self.rules is None else tuple(sorted(self.rules.items()))
        return dict(mesh=self.mesh, rules=rules)

    def _put(self, x, sharding=None):
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        return dist.to_global(x, sharding or shd.replicated(self.mesh))

    def place(self, params):
        """The student's parameters (a pure dict, any layout) in the rollout layout: one reshard per
        rollout, freed when the caller drops it."""
        if self.mesh is None:
            return params
        model = nnx.merge(self.graphdef, params)
        return jax.device_put(params, shd.param_shardings(model, self.mesh, self.rules))  # one cached transfer

    def run(self, params, ids, pmask, key, *, group: int = 1, caps=None) -> tuple[Rollout, EngineStats]:
        """Sample `group` sequences per prompt. ids / pmask [n, P] host or device (left-padded); key: a
        PRNG key; caps [n * group] per-sequence length caps (default max_new_tokens). Sequence q =
        j * group + g is sample g of prompt j and row q of the result. -> (Rollout, EngineStats)."""
        spec = self.spec
        ids, pmask = dist.to_host(ids).astype(np.int32), dist.to_host(pmask).astype(np.int32)
        if ids.ndim != 2 or ids.shape != pmask.shape:
            raise OpdError(f"prompt ids and mask must both be [n, P]; got {ids.shape} and {pmask.shape}")
        if ids.shape[1] != spec.prompt_len:
            raise OpdError(f"prompts are {ids.shape[1]} tokens long; this engine was built for {spec.prompt_len}")
        n_seq = ids.shape[0] * group
        if group < 1:
            raise OpdError(f"group must be >= 1, got {group}")
        if spec.slots > n_seq:
            raise OpdError(f"rollout slots {spec.slots} exceed the {n_seq} sequences to sample "
                           f"({ids.shape[0]} prompts x {group}); use at most {n_seq}")
        caps = np.full(n_seq, spec.max_new_tokens, np.int32) if caps is None else np.asarray(caps, np.int32)
        if caps.shape != (n_seq,) or caps.min() < 1 or caps.max() > spec.max_new_tokens:
            raise OpdError(f"length caps must be {n_seq} numbers in [1, {spec.max_new_tokens}]; got "
                           f"shape {caps.shape}, range [{caps.min()}, {caps.max()}]")
        st = self._static()
        params = self.place(params)
        rows = lambda a: None if self.mesh is None else shd.rows_sharding(a.shape[0], a.ndim, self.mesh, self.rules)  # noqa: E731
        bases = sequence_keys(key, np.arange(n_seq))
        if spec.slots == n_seq:  # a slot per sequence: nothing to refill, the whole rollout is one program
            tokens, lp, mask, steps = _whole(self.graphdef, params, self._put(ids, rows(ids)), self._put(pmask, rows(pmask)),
                                             self._put(bases, rows(bases)), self._put(caps, rows(caps)), spec=spec,
                                             group=group, **st)
            gen, steps = dist.to_host(mask).sum(1), int(dist.to_host(steps))
            stats = EngineStats(spec.slots, decode_steps=steps, generated=int(gen.sum()), dispatches=1,
                                prefill_rows=ids.shape[0], handed_back=[int(q) for q in np.argsort(gen, kind="stable")])
            return Rollout(tokens, lp, mask, jnp.int32(steps)), stats
        store = _prefill(self.graphdef, params, self._put(ids, rows(ids)), self._put(pmask, rows(pmask)), **st)
        slots = _empty(cfg=self.model_cfg, spec=spec, **st)
        stats = EngineStats(spec.slots, prefill_rows=ids.shape[0])
        n = spec.max_new_tokens
        out_tok = np.full((n_seq, n), spec.pad_id, np.int32)
        out_lp = np.zeros((n_seq, n), np.float32)
        out_mask = np.zeros((n_seq, n), np.int32)
        held = np.full(spec.slots, -1)  # sequence id per slot on the host; -1 = free
        seen = np.zeros(spec.slots, np.int64)  # tokens of each slot's sequence already counted
        nxt = 0
        while True:
            free = np.flatnonzero(held < 0)
            if nxt < n_seq and free.size:
                take_n = min(free.size, n_seq - nxt)
                into = free[:take_n]
                take = np.zeros(spec.slots, bool)
                take[into] = True
                seq = np.zeros(spec.slots, np.int32)
                seq[into] = np.arange(nxt, nxt + take_n)
                held[into] = seq[into]
                seen[into] = 0
                nxt += take_n
                slots = _insert(slots, store, self._put(take), self._put(seq // group), self._put(seq),
                                self._put(np.where(take, caps[seq], 0).astype(np.int32)),
                                self._put(bases[seq], rows(bases[seq])), spec=spec, **st)
            if not (held >= 0).any():
                break
            queued = nxt < n_seq
            slots, ran = _decode(self.graphdef, params, slots, spec=spec, **st)
            stats.dispatches += 1
            live, gen = (dist.to_host(x) for x in (slots.live, slots.gen))
            ran = int(dist.to_host(ran))
            stats.decode_steps += ran
            if queued:
                stats.queued_steps += ran
                stats.queued_generated += int(np.where(held >= 0, gen - seen, 0).sum())
            seen = np.where(held >= 0, gen, seen)
            done = np.flatnonzero((held >= 0) & ~live)
            if done.size:
                width = min(spec.slots, 1 << int(np.ceil(np.log2(done.size))))  # few compiled sizes
                idx = np.concatenate([done, np.repeat(done[-1:], width - done.size)])
                tok, lp = (dist.to_host(x)[:done.size] for x in _gather(slots.tokens, slots.logprobs, self._put(idx)))
                for j, s in enumerate(done):
                    q, g = held[s], int(gen[s])
                    out_tok[q], out_lp[q], out_mask[q, :g] = tok[j], lp[j], 1
                    stats.generated += g
                    stats.handed_back.append(int(q))
                held[done] = -1
        tokens = np.concatenate([np.repeat(ids, group, 0), out_tok], 1)
        place = (lambda a: self._put(a, rows(a)))
        roll = Rollout(place(tokens), place(out_lp), place(out_mask), jnp.int32(stats.decode_steps))
        return roll, stats
