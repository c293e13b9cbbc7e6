"""The rollout engine's settings (`EngineSpec`), statistics, per-sequence keys and compiled programs
(the host loops that run them: `opd_jax.stream`, `opd_jax.engine`).

    prefill(params, ids [n, P], pmask [n, P]) -> store: the prompts' KV [n, L, P, K, Dh] and next-token
        logits [n, V]; one row per *prompt*: its G samples share it
    insert(slots, store, take [S], src [S], seq [S], cap [S], base [S, 2]) -> slots: slot s (where
        take[s]) receives prompt src[s]'s KV and logits and starts sequence seq[s] with length cap cap[s]
    decode(params, slots, limit) -> (slots, steps): up to `limit` decode steps over all S slots in one
        dispatch (the host picks it per call, at most the sequences' remaining lengths); stops early once
        no slot is live
    whole_rollout(params, ids, pmask, key_data [2], cap) -> (tokens, logprobs, mask, steps): prefill and
        every decode step in one program, for a slot per sequence (nothing to refill)

`spec` (an `engine.EngineSpec`), `mesh` and `rules` (a sorted tuple of the rollout rules) are static.
Slot layout: each slot's cache holds its prompt at [0, P) (left-padded) and its i-th new token at
P + i, so every slot has its own filled length; `valid [S, C]` marks the real keys and attention reads
only the shortest static length that covers every live slot (`attention.decode_attention`). Token i
of sequence q is drawn with fold_in(base_q, i), base_q = fold_in(key, q) (`engine.sequence_keys`).
Decode loops take each layer's weights once, outside the loop (`Transformer.split_layers`).
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
from opd_jax.sampling import sample_rows

TRACES = {"prefill": 0, "insert": 0, "decode": 0, "whole": 0}  # times each program was traced (= compiled)


@dataclass(frozen=True)
class EngineSpec:
    """Everything static about a rollout: prompt length P, new tokens N (the longest a sequence may
    get), slots S, the sampling settings (temperature 0 = greedy), stop ids, the pad id, the decode
    steps per dispatch, and split_layers: decode loops take each layer's weights once, outside the loop,
    and run the layers unrolled (`Transformer.split_layers`). XLA:CPU copies a dynamic slice of the
    stacked weights at every layer of every step (SmolLM2 on this CPU: 74.3 -> 53.6 ms a step with the
    split), but an unrolled decode compiles slower (a Qwen3-1.7B-shaped decode: about 30 s vs 8 s here)
    and an accelerator's XLA reads the stacked weights in place, so the default (`default_split`) splits
    on the CPU backend only."""

    prompt_len: int
    max_new_tokens: int
    slots: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple = ()
    pad_id: int = 0
    steps_per_call: int = 8
    split_layers: bool = False

    @classmethod
    def for_data(cls, dc, n_seq: int, temperature: float, *, stop=(), pad_id: int = 0,
                 steps_per_call: int | None = None, split_layers: bool | None = None) -> "EngineSpec":
        """The engine settings of a run's `data` config for `n_seq` sequences: data.rollout_slots slots
        (0 = one per sequence; at most n_seq); temperature 0 (greedy) drops top-k / top-p."""
        return cls(prompt_len=dc.max_prompt_len, max_new_tokens=dc.max_new_tokens,
                   slots=min(dc.rollout_slots or n_seq, n_seq), temperature=float(temperature),
                   top_k=dc.top_k if temperature else 0, top_p=dc.top_p if temperature else 1.0,
                   stop=tuple(sorted(stop)), pad_id=pad_id, steps_per_call=steps_per_call or dc.decode_steps_per_call,
                   split_layers=default_split() if split_layers is None else split_layers)

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


def default_split() -> bool:
    """`EngineSpec.split_layers` by default: on the CPU backend only."""
    return jax.default_backend() == "cpu"


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


def base_keys(key, seq):
    """Key data [n, 2] of sequences `seq` [n] int32 under `key` (a typed key): fold_in(key, q), the base
    every token of sequence q draws from (token i: fold_in(base, i)). Traceable: the one-program rollout
    makes them inside its program."""
    return jax.vmap(lambda q: jax.random.key_data(jax.random.fold_in(key, q)))(seq)


def sequence_keys(key, seq) -> np.ndarray:
    """`base_keys` on the host: key data [n, 2] of sequences `seq` [n] under `key`."""
    key = jax.random.wrap_key_data(jnp.asarray(dist.to_host(jax.random.key_data(key))))  # a host copy
    return np.asarray(base_keys(key, jnp.asarray(np.asarray(seq, np.int32))))



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


def constrain(mesh, rules):
    """(put(x, logical_axes), layout) inside a program: `sharding.layout_fn` on a mesh; without one,
    put leaves x as it is and layout is None."""
    if mesh is None:
        return (lambda x, axes: x), None
    layout = shd.layout_fn(mesh, dict(rules) if rules is not None else None)
    return layout, layout


def empty_slots(cfg, spec) -> Slots:
    """Slots that hold nothing (seq -1, not live)."""
    s, n = spec.slots, spec.max_new_tokens
    k, v = init_cache(cfg, s, spec.prompt_len + n)
    zi = jnp.zeros((s,), jnp.int32)
    return Slots(k, v, jnp.zeros((s, spec.prompt_len + n), bool), zi, zi, zi - 1, jnp.zeros((s,), bool), zi,
                 jnp.zeros((s, cfg.vocab_size), jnp.float32), jnp.full((s, n), spec.pad_id, jnp.int32),
                 jnp.zeros((s, n), jnp.float32),
                 jnp.zeros((s,) + jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape, jnp.uint32))


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "mesh", "rules"))
def empty(*, cfg, spec, mesh, rules):
    put, _ = constrain(mesh, rules)
    return Slots(*(put(x, ax) for x, ax in zip(empty_slots(cfg, spec), SLOT_AXES)))


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "rules"))
def prefill(graphdef, params, ids, pmask, *, mesh, rules):
    """-> (k, v [n, L, P, K, Dh], logits [n, V] float32, pmask [n, P])."""
    TRACES["prefill"] += 1
    return prefill_body(nnx.merge(graphdef, params), ids, pmask, mesh, rules)


def prefill_body(model, ids, pmask, mesh, rules):
    put, layout = constrain(mesh, rules)
    n, p = ids.shape
    cache = tuple(put(c, CACHE_AXES) for c in init_cache(model.cfg, n, p))
    with activation_layout(layout):
        h, (k, v) = model.run(ids, positions_from_mask(pmask), jnp.arange(p), pmask.astype(bool), cache, 0)
    logits = model.logits(h[:, -1:])[:, 0]
    return put(k, CACHE_AXES), put(v, CACHE_AXES), logits, pmask


@functools.partial(jax.jit, static_argnames=("spec", "mesh", "rules"), donate_argnums=(0,))
def insert(slots: Slots, store, take, src, seq, cap, base, *, spec, mesh, rules):
    """Slot s (where take[s]) starts sequence seq[s] (length cap cap[s], key data base[s] [S, 2]) from
    stored prompt src[s]."""
    TRACES["insert"] += 1
    put, _ = constrain(mesh, rules)
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
def whole_rollout(graphdef, params, ids, pmask, key_data, cap, *, spec, group, mesh, rules):
    """The whole rollout in one program when every sequence has its own slot (nothing to refill):
    prefill [n, P], copy each prompt's KV to its `group` rows, then decode all rows in lock step until
    every one has ended (at most N steps). Row q is sequence q: its key data fold_in(key, q) is made
    here from the rollout key's data key_data [2] (no host round trip), cap [n * group] its length cap.
    Every live row is at the same step i, so the cache write, the attention length and the keys each row
    sees are the ones the slot loop gives it: the same tokens.
    -> (tokens [n * group, P + N], logprobs [n * group, N], mask [n * group, N], steps run)."""
    TRACES["whole"] += 1
    put, layout = constrain(mesh, rules)
    model = nnx.merge(graphdef, params)
    p, n = spec.prompt_len, spec.max_new_tokens
    k, v, logits, _ = prefill_body(model, ids, pmask, mesh, rules)
    rows = lambda x: jnp.repeat(x, group, axis=0) if group > 1 else x  # noqa: E731
    grow = lambda c: jnp.pad(rows(c), ((0, 0), (0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731  [R, L, P+N, K, Dh]
    k, v, logits, pm = put(grow(k), CACHE_AXES), put(grow(v), CACHE_AXES), rows(logits), rows(pmask)
    r = pm.shape[0]
    base = put(base_keys(jax.random.wrap_key_data(key_data), jnp.arange(r, dtype=jnp.int32)), ("batch", None))
    start = dict(i=jnp.int32(0), k=k, v=v, valid=jnp.concatenate([pm.astype(bool), jnp.zeros((r, n), bool)], 1),
                 live=jnp.ones((r,), bool), gen=jnp.zeros((r,), jnp.int32), logits=logits,
                 tokens=jnp.full((r, n), spec.pad_id, jnp.int32), logprobs=jnp.zeros((r, n), jnp.float32))
    pos0 = pm.sum(1).astype(jnp.int32)
    layers = model.split_layers() if spec.split_layers else None  # once, outside the loop

    def body(c):
        i, live = c["i"], c["live"]
        tok, lp, ended = next_tokens(c["logits"], base, jnp.full(live.shape, i), live, cap, spec)
        col = lambda buf, x, at: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, at))  # noqa: E731
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
def decode(graphdef, params, slots: Slots, limit, *, spec, mesh, rules):
    """Up to `limit` (an int32 scalar, not static: one program for every limit) decode steps over all
    slots -> (slots, steps run)."""
    TRACES["decode"] += 1
    put, layout = constrain(mesh, rules)
    model = nnx.merge(graphdef, params)
    p, n = spec.prompt_len, spec.max_new_tokens
    c = p + n
    layers = model.split_layers() if spec.split_layers else None  # once, outside the loop

    def cond(carry):
        i, s = carry
        return (i < limit) & jnp.any(s.live)

    def body(carry):
        i, s = carry
        live = s.live
        tok, lp, ended = next_tokens(s.logits, s.base, s.gen, live, s.cap, spec)
        at = jnp.minimum(s.gen, n - 1)  # an ended slot rewrites what it holds there
        tokens = set_rows(s.tokens, at, tok, live)
        logprobs = set_rows(s.logprobs, at, lp, live)
        w = jnp.minimum(p + s.gen, c - 1)  # this token's cache slot
        valid = set_rows(s.valid, w, jnp.ones_like(live), live)
        reach = jnp.max(jnp.where(live, w, 0))[None]  # attention reads up to the furthest live slot
        with activation_layout(layout):
            h, (k, v) = model.run(tok[:, None], s.pos[:, None], reach, valid, (s.k, s.v), w, layers=layers)
        step = live.astype(jnp.int32)
        s = Slots(put(k, CACHE_AXES), put(v, CACHE_AXES), valid, s.pos + step, s.gen + step, s.seq,
                  live & ~ended, s.cap, model.logits(h)[:, 0], tokens, logprobs, s.base)
        return i + 1, Slots(*(put(x, ax) for x, ax in zip(s, SLOT_AXES)))

    steps, slots = jax.lax.while_loop(cond, body, (jnp.int32(0), slots))
    return slots, steps


def next_tokens(logits, base, step, live, cap, spec):
    """One decode step's sampling for every row: logits [R, V], base [R, 2] the rows' key data, step [R]
    each row's new-token index (its key is fold_in(base, step)), live [R], cap [R] each row's length cap.
    -> (tokens [R] (pad where not live), their log-probs [R], ended [R]: live rows that drew a stop id or
    reached their cap)."""
    keys = jax.vmap(lambda b, g: jax.random.fold_in(jax.random.wrap_key_data(b), g))(base, step)
    tok, lp = sample_rows(logits, keys, spec.temperature, spec.top_k, spec.top_p)
    tok = jnp.where(live, tok, spec.pad_id)
    stop = jnp.asarray(spec.stop or (-1,), jnp.int32)
    ended = live & ((jnp.isin(tok, stop) if spec.stop else False) | (step + 1 >= cap))
    return tok, lp, ended


def set_rows(buf, at, values, where):
    """buf [S, M] with buf[s, at[s]] = values[s] where `where[s]` (else unchanged): a per-row update
    (vmap of dynamic_update_slice), partitioned row by row with no collective."""
    def one(row, j, x, w):
        return jax.lax.dynamic_update_slice(row, jnp.where(w, x, row[j]).astype(row.dtype)[None], (j,))
    return jax.vmap(one)(buf, at, values, where)


@jax.jit
def gather_rows(tokens, logprobs, idx):
    return jnp.take(tokens, idx, axis=0), jnp.take(logprobs, idx, axis=0)
