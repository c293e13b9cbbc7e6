"""The rollout engine: a fixed number of decode slots that refill as sequences end.

`Engine.run` samples one batch. With a slot per sequence there is nothing to refill: prefill and every
decode step run as one program (`rollout_programs.whole_rollout`). With fewer slots the batch goes
through a `Stream` (`opd_jax.stream`, the one host loop): prefill every prompt once; fill free slots
from the queue of sequences; decode; hand finished rows back; refill; until every sequence has ended.
The settings (`EngineSpec`), statistics and compiled programs live in `opd_jax.rollout_programs`;
`generate` below is the simple call.

Randomness: token i of sequence q is drawn with fold_in(fold_in(key, q), i) (each slot carries its
sequence's base key fold_in(key, q), so slots may hold sequences of different keys: the asynchronous
pipeline's batches). A sequence's tokens therefore depend only on its prompt, its id and the key: not
on the slot that ran it, on when it started, or on how many slots there are.

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
from opd_jax.rollout_programs import (TRACES, EngineSpec, EngineStats, sequence_keys,  # noqa: F401 (public here)
                                      default_split, whole_rollout)
from opd_jax.sampling import Rollout
from opd_jax.stream import Stream, length_caps


@dataclass(frozen=True)
class Engine:
    """Runs rollouts of one `EngineSpec` for a student (graphdef, ModelConfig); `mesh` + `rules` (the rollout rules)
    place the weights and the slots. `run` is the whole rollout; the programs are in `rollout_programs`."""

    graphdef: object
    model_cfg: object  # the student's ModelConfig
    spec: EngineSpec
    mesh: object = None
    rules: dict | None = None
    _shardings: dict = field(default_factory=dict, compare=False, repr=False)  # parameter tree -> rollout shardings

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

    def rows(self, a):
        """The rows sharding of host array `a` on the rollout mesh (None without a mesh)."""
        return None if self.mesh is None else shd.rows_sharding(a.shape[0], a.ndim, self.mesh, self.rules)

    def key_data(self, key):
        """A PRNG key's data [2] where the rollout programs run (replicated on the rollout mesh), moved
        device to device: no wait for whatever computed the key."""
        data = jax.random.key_data(key)
        return data if self.mesh is None else jax.device_put(data, shd.replicated(self.mesh))

    def shardings(self, params):
        """The rollout layout's shardings for a parameter tree like `params` (None without a mesh), worked
        out once per tree structure."""
        if self.mesh is None:
            return None
        tree = jax.tree_util.tree_structure(params)
        if tree not in self._shardings:
            self._shardings[tree] = shd.param_shardings(nnx.merge(self.graphdef, params), self.mesh, self.rules)
        return self._shardings[tree]

    def place(self, params):
        """The student's parameters (a pure dict, any layout) in the rollout layout: one reshard per
        rollout, freed when the caller drops it."""
        if self.mesh is None:
            return params
        return jax.device_put(params, self.shardings(params))  # one transfer; none where already placed

    def run(self, params, ids, pmask, key, *, group: int = 1, caps=None) -> tuple[Rollout, EngineStats]:
        """Sample `group` sequences per prompt. ids / pmask [n, P] host or device (left-padded); key: a
        PRNG key; caps [n * group] per-sequence length caps (default max_new_tokens). Sequence q =
        j * group + g is sample g of prompt j and row q of the result. -> (Rollout, EngineStats; with a slot
        per sequence a `PendingStats`, read from the device when first asked for)."""
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
        if spec.slots == n_seq:  # a slot per sequence: nothing to refill, the whole rollout is one program
            caps = length_caps(caps, n_seq, spec.max_new_tokens)
            st, params, rows = self.static(), self.place(params), self.rows
            tokens, lp, mask, steps = whole_rollout(
                self.graphdef, params, self.put(ids, rows(ids)), self.put(pmask, rows(pmask)), self.key_data(key),
                self.put(caps, rows(caps)), spec=spec, group=group, **st)
            # nothing here waits for the rollout: the statistics are read from the device when first asked for
            return Rollout(tokens, lp, mask, steps), PendingStats(spec.slots, ids.shape[0], mask, steps)
        stream = Stream(self, group)  # fewer slots than sequences: slots refilled as sequences end
        stream.set_params(params, 0)
        stream.add(0, ids, pmask, key, caps=caps)
        while stream.queue or stream.live:
            stream.advance(drain=True)  # nothing follows this batch: its last sequences end in one call
        roll, _, _ = stream.take(0)
        stats = stream.stats
        stats.handed_back = [q for _, q in stats.handed_back]
        return roll, stats


class PendingStats:
    """The `EngineStats` of a one-program rollout, read from the device when first asked for (a step
    that logs nothing never waits for its rollout to end): mask [R, N] the generated tokens, steps the
    decode steps run. Sequences hand back in the order they ended (fewest tokens first, then by id)."""

    def __init__(self, slots: int, prefill_rows: int, mask, steps):
        self._args, self._stats = (slots, prefill_rows, mask, steps), None

    def __getattr__(self, name):
        if self._stats is None:
            slots, prefill_rows, mask, steps = self._args
            gen = dist.to_host(mask).sum(1)
            self._stats = EngineStats(slots, decode_steps=int(dist.to_host(steps)), generated=int(gen.sum()),
                                      dispatches=1, prefill_rows=prefill_rows,
                                      handed_back=[int(q) for q in np.argsort(gen, kind="stable")])
        return getattr(self._stats, name)


def trace_count() -> int:
    """How many times the decoding programs (the slot loop's `decode`, `whole_rollout`) have been traced
    (= compiled) in this process."""
    return TRACES["decode"] + TRACES["whole"]


def generate(model, prompt_ids, prompt_mask, *, key, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | list[int] | None = None, pad_id: int = 0,
             mesh=None, rules=None, slots: int | None = None, group: int = 1, steps_per_call: int = 8,
             split_layers: bool | None = None) -> Rollout:
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
                      top_p=float(top_p), stop=stop, pad_id=int(pad_id), steps_per_call=steps_per_call,
                      split_layers=default_split() if split_layers is None else split_layers)
    rules = shd.ROLLOUT_RULES if rules is None and mesh is not None else rules
    engine = Engine(graphdef, model.cfg, spec, mesh, rules)
    return engine.run(nnx.to_pure_dict(state), prompt_ids, prompt_mask, key, group=group)[0]
