"""The rollout engine: a fixed number of decode slots that refill as sequences end.

The compiled programs (prefill, insert, decode, whole_rollout) are in `opd_jax.rollout_programs`;
this module holds the settings, the host loop and `generate`, its simple call.

    host: with a slot per sequence, one `whole_rollout` call (nothing to refill). Otherwise prefill every
    prompt once; fill free slots from the queue of sequence ids; decode; read back which slots ended;
    hand their rows back; refill; until the queue is empty and no slot is live.

Randomness: token i of sequence q is drawn with fold_in(fold_in(key, q), i) (each slot carries its
sequence's base key fold_in(key, q), so slots may hold sequences of different keys: the asynchronous
pipeline's batches). A sequence's tokens therefore depend only on its prompt, its id and the key: not on the slot that ran it, on when it
started, or on how many slots there are.

Rollout layout: the programs run on parameters placed with the rollout rules (`mesh.rollout_rules`,
default `sharding.ROLLOUT_RULES`: weights replicated over the batch axes, split over `tensor` only),
slots over the batch axes; a decode step then moves activations, not weights.

Occupancy = generated tokens / (slots x decode steps run): the share of slot-steps that produced a
token. A static batch is the engine with one slot per row (every row waits for the longest).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import distributed as dist
from opd_jax import sharding as shd
from opd_jax.errors import OpdError
from opd_jax.rollout_programs import TRACES, decode, empty, gather_rows, insert, prefill, whole_rollout
from opd_jax.sampling import Rollout


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


def sequence_keys(key, seq) -> np.ndarray:
    """Key data [n, 2] of sequences `seq` [n] under `key`: fold_in(key, q), the base every token of
    sequence q draws from (token i: fold_in(base, i))."""
    seq = jnp.asarray(np.asarray(seq, np.int32))
    key = jax.random.wrap_key_data(jnp.asarray(dist.to_host(jax.random.key_data(key))))  # a host copy
    return np.asarray(jax.random.key_data(jax.vmap(lambda q: jax.random.fold_in(key, q))(seq)))



@dataclass(frozen=True)
class Engine:
    """Runs rollouts of one `EngineSpec` for a student (graphdef, ModelConfig); `mesh` + `rules` (the rollout rules)
    place the weights and the slots. `run` is the whole rollout; the programs are in `rollout_programs`."""

    graphdef: object
    model_cfg: object  # the student's ModelConfig
    spec: EngineSpec
    mesh: object = None
    rules: dict | None = None

    def __post_init__(self):
        self.spec.check(self.model_cfg.max_position_embeddings)

    def static(self):
        rules = None if self.rules is None else tuple(sorted(self.rules.items()))
        return dict(mesh=self.mesh, rules=rules)

    def put(self, x, sharding=None):
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
        st = self.static()
        params = self.place(params)
        rows = lambda a: None if self.mesh is None else shd.rows_sharding(a.shape[0], a.ndim, self.mesh, self.rules)  # noqa: E731
        bases = sequence_keys(key, np.arange(n_seq))
        if spec.slots == n_seq:  # a slot per sequence: nothing to refill, the whole rollout is one program
            tokens, lp, mask, steps = whole_rollout(self.graphdef, params, self.put(ids, rows(ids)), self.put(pmask, rows(pmask)),
                                             self.put(bases, rows(bases)), self.put(caps, rows(caps)), spec=spec,
                                             group=group, **st)
            gen, steps = dist.to_host(mask).sum(1), int(dist.to_host(steps))
            stats = EngineStats(spec.slots, decode_steps=steps, generated=int(gen.sum()), dispatches=1,
                                prefill_rows=ids.shape[0], handed_back=[int(q) for q in np.argsort(gen, kind="stable")])
            return Rollout(tokens, lp, mask, jnp.int32(steps)), stats
        store = prefill(self.graphdef, params, self.put(ids, rows(ids)), self.put(pmask, rows(pmask)), **st)
        slots = empty(cfg=self.model_cfg, spec=spec, **st)
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
                slots = insert(slots, store, self.put(take), self.put(seq // group), self.put(seq),
                                self.put(np.where(take, caps[seq], 0).astype(np.int32)),
                                self.put(bases[seq], rows(bases[seq])), spec=spec, **st)
            if not (held >= 0).any():
                break
            queued = nxt < n_seq
            slots, ran = decode(self.graphdef, params, slots, spec=spec, **st)
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
                tok, lp = (dist.to_host(x)[:done.size] for x in gather_rows(slots.tokens, slots.logprobs, self.put(idx)))
                for j, s in enumerate(done):
                    q, g = held[s], int(gen[s])
                    out_tok[q], out_lp[q], out_mask[q, :g] = tok[j], lp[j], 1
                    stats.generated += g
                    stats.handed_back.append(int(q))
                held[done] = -1
        tokens = np.concatenate([np.repeat(ids, group, 0), out_tok], 1)
        place = (lambda a: self.put(a, rows(a)))
        roll = Rollout(place(tokens), place(out_lp), place(out_mask), jnp.int32(stats.decode_steps))
        return roll, stats


def trace_count() -> int:
    """How many times the decoding programs (the slot loop's `decode`, `whole_rollout`) have been traced
    (= compiled) in this process."""
    return TRACES["decode"] + TRACES["whole"]


def generate(model, prompt_ids, prompt_mask, *, key, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | list[int] | None = None, pad_id: int = 0,
             mesh=None, rules=None, slots: int | None = None, group: int = 1, steps_per_call: int = 8) -> Rollout:
    """Sample up to `max_new_tokens` tokens after left-padded prompts, through the rollout engine
    (`opd_jax.engine`; this is its simple call).

    eos_id: the stop ids, one int or several (for example the tokenizer's EOS and every id in
    generation_config.json's eos_token_id); a row ends after the first of them, which counts in its
    mask. Finished rows are filled with pad_id, which may itself be a stop id (Qwen's
    <|endoftext|>): padding never ends a live row early or counts in the mask.

    prompt_ids, prompt_mask: [B, P] (mask 1 on real tokens, left padding 0). `temperature=0` is
    greedy. group: samples per prompt (rows = B * group, sample g of prompt j at row j * group + g;
    the prompt is prefilled once). slots: decode slots (default every row). Row q draws token i with
    fold_in(fold_in(key, q), i): the result does not depend on `slots`. With `mesh`, the weights are
    placed in the rollout layout (`rules`, default `sharding.ROLLOUT_RULES`) and the slots over the
    batch axes. Compiled once per (shapes, settings).
    """
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise OpdError(f"prompt_ids and prompt_mask must both be [B, P]; got {prompt_ids.shape} and "
                       f"{prompt_mask.shape}")
    stop = tuple(sorted({int(eos_id)} if isinstance(eos_id, (int, np.integer)) else {int(i) for i in eos_id or ()}))
    graphdef, state = nnx.split(model)
    spec = EngineSpec(prompt_len=prompt_ids.shape[1], max_new_tokens=max_new_tokens,
                      slots=slots or prompt_ids.shape[0] * group, temperature=float(temperature), top_k=int(top_k),
                      top_p=float(top_p), stop=stop, pad_id=int(pad_id), steps_per_call=steps_per_call)
    rules = shd.ROLLOUT_RULES if rules is None and mesh is not None else rules
    engine = Engine(graphdef, model.cfg, spec, mesh, rules)
    return engine.run(nnx.to_pure_dict(state), prompt_ids, prompt_mask, key, group=group)[0]
