"""The rollout engine with slots that persist across batches, and a policy version on every token.

`Engine.run` samples one batch and returns when its last sequence ends, so its last calls run with
most slots empty. A `Stream` keeps its slots between batches: batch b+1's sequences take the slots
that batch b's early finishers free, and a sequence still running when its batch's turn is over
simply continues (a partial rollout), under whatever weights the stream holds by then.

    stream = Stream(engine, group)
    stream.set_params(params, version)          # the weights that sample from now on (a weight sync)
    stream.add(b, ids, pmask, key)              # batch b: prefill its prompts, queue its sequences
    finished = stream.advance()                 # refill free slots, one decode call; -> batches done
    rollout, versions, stats = stream.take(b)   # a finished batch, in sequence order

Versions: token i of a sequence carries the version of the weights whose forward pass produced the
logits it was drawn from (the prefill's for the first token, then each decode call's), so the
sampler's log-probs and the version tags always agree. versions [n, N] int32, -1 past the end.

Keys: sequence q of batch b draws token i with fold_in(fold_in(key_b, q), i), exactly as
`Engine.run(key=key_b)` does; with the same weights a stream reproduces the synchronous tokens.
"""

from __future__ import annotations

from collections import deque

import jax.numpy as jnp
import numpy as np

from opd_jax import distributed as dist
from opd_jax.errors import OpdError
from opd_jax.rollout_programs import EngineStats, decode, empty, gather_rows, insert, prefill, sequence_keys
from opd_jax.sampling import Rollout


def length_caps(caps, n_seq: int, n_max: int) -> np.ndarray:
    """Per-sequence length caps [n_seq] int32 (None: n_max each), or a one-line error unless each is in
    [1, n_max]."""
    caps = np.full(n_seq, n_max, np.int32) if caps is None else np.asarray(caps, np.int32)
    if caps.shape != (n_seq,) or caps.min() < 1 or caps.max() > n_max:
        raise OpdError(f"length caps must be {n_seq} numbers in [1, {n_max}]; got shape {caps.shape}, "
                       f"range [{caps.min()}, {caps.max()}]")
    return caps


class _Batch:
    def __init__(self, ids, pmask, store, bases, n_seq, n_new, pad_id):
        self.ids, self.pmask, self.store, self.bases = ids, pmask, store, bases
        self.tokens = np.full((n_seq, n_new), pad_id, np.int32)
        self.logprobs = np.zeros((n_seq, n_new), np.float32)
        self.mask = np.zeros((n_seq, n_new), np.int32)
        self.versions = np.full((n_seq, n_new), -1, np.int32)
        self.left = n_seq


class Stream:
    """Persistent decode slots over batches of `group` samples per prompt (see the module docstring)."""

    def __init__(self, engine, group: int = 1):
        self.engine, self.group, self.spec = engine, group, engine.spec
        self.st = engine.static()
        self.slots = empty(cfg=engine.model_cfg, spec=self.spec, **self.st)
        s, n = self.spec.slots, self.spec.max_new_tokens
        self.held = np.full((s, 2), -1)  # (batch, sequence) per slot; -1 = free
        self.seen = np.zeros(s, np.int64)  # tokens of the slot's sequence already tagged
        self.cap = np.zeros(s, np.int64)  # the length cap of the slot's sequence
        self.logit_version = np.full(s, -1, np.int32)  # version that produced the slot's next-token logits
        self.tags = np.full((s, n), -1, np.int32)  # version of each token of the slot's sequence
        self.queue: deque = deque()  # (batch, sequence) not yet in a slot
        self.batches: dict = {}
        self.params = self.version = None
        self.stats = EngineStats(s)

    def set_params(self, params, version: int):
        """Sample with `params` (any layout; placed in the rollout layout here) from the next call on."""
        self.params, self.version = self.engine.place(params), int(version)

    def add(self, b: int, ids, pmask, key, caps=None):
        """Batch `b`: `group` samples of each prompt ids / pmask [n, P] with key `key` (prefilled now, with
        the current weights; its sequences wait in the queue for free slots); caps [n * group] optional
        per-sequence length caps (default max_new_tokens)."""
        if self.params is None:
            raise OpdError("Stream.add before set_params: the stream has no weights to sample with")
        if b in self.batches:
            raise OpdError(f"batch {b} was already added to the stream")
        ids, pmask = dist.to_host(ids).astype(np.int32), dist.to_host(pmask).astype(np.int32)
        if ids.shape[1] != self.spec.prompt_len:
            raise OpdError(f"prompts are {ids.shape[1]} tokens long; this engine was built for {self.spec.prompt_len}")
        put = self.engine.put
        store = prefill(self.engine.graphdef, self.params, put(ids, self.engine.rows(ids)), put(pmask, self.engine.rows(pmask)),
                         **self.st)
        n_seq = ids.shape[0] * self.group
        self.batches[b] = _Batch(ids, pmask, store, sequence_keys(key, np.arange(n_seq)), n_seq,
                                 self.spec.max_new_tokens, self.spec.pad_id)
        self.batches[b].prefill_version = self.version
        self.batches[b].caps = length_caps(caps, n_seq, self.spec.max_new_tokens)
        self.stats.prefill_rows += ids.shape[0]
        self.queue.extend((b, q) for q in range(n_seq))

    @property
    def live(self) -> int:
        """Sequences in slots."""
        return int((self.held[:, 0] >= 0).sum())

    def _refill(self):
        free = np.flatnonzero(self.held[:, 0] < 0)
        spec, put, s = self.spec, self.engine.put, self.spec.slots
        by_batch: dict = {}
        for slot in free[:len(self.queue)]:
            b, q = self.queue.popleft()
            by_batch.setdefault(b, []).append((slot, q))
        for b, pairs in by_batch.items():  # one insert per batch (each has its own prompt store)
            bat = self.batches[b]
            take, src, seq = np.zeros(s, bool), np.zeros(s, np.int32), np.zeros(s, np.int32)
            cap, base = np.zeros(s, np.int32), np.zeros((s,) + bat.bases.shape[1:], np.uint32)
            for slot, q in pairs:
                take[slot], src[slot], seq[slot] = True, q // self.group, q
                cap[slot], base[slot] = bat.caps[q], bat.bases[q]
                self.held[slot] = (b, q)
                self.seen[slot], self.tags[slot], self.cap[slot] = 0, -1, bat.caps[q]
                self.logit_version[slot] = bat.prefill_version
            self.slots = insert(self.slots, bat.store, put(take), put(src), put(seq), put(cap),
                                 put(base, self.engine.rows(base)), spec=spec, **self.st)

    def _limit(self, drain: bool) -> int:
        """Decode steps for the next call: with sequences queued, spec.steps_per_call but no further than
        the first slot's length cap (its slot is refilled as soon as it is free); with none queued and
        `drain`, until the last slot's cap (every sequence ends in this call); else spec.steps_per_call."""
        busy = self.held[:, 0] >= 0
        left = (self.cap - self.seen)[busy]
        if self.queue:
            return int(max(1, min(self.spec.steps_per_call, left.min())))
        return int(left.max()) if drain else self.spec.steps_per_call

    def advance(self, drain: bool = False) -> list[int]:
        """Refill free slots from the queue, run one decode call, hand finished rows back. drain: once no
        sequence is queued, the call runs until every slot has ended (one batch with nothing to follow:
        `Engine.run`). -> the batches whose last sequence finished in this call."""
        self._refill()
        if not self.live:
            return []
        queued = bool(self.queue)
        limit = self.engine.put(np.int32(self._limit(drain)))
        self.slots, ran = decode(self.engine.graphdef, self.params, self.slots, limit, spec=self.spec, **self.st)
        live, gen = (dist.to_host(x) for x in (self.slots.live, self.slots.gen))
        ran = int(dist.to_host(ran))
        st, busy = self.stats, self.held[:, 0] >= 0
        st.dispatches += 1
        st.decode_steps += ran
        if queued:
            st.queued_steps += ran
            st.queued_generated += int(np.where(busy, gen - self.seen, 0).sum())
        for slot in np.flatnonzero(busy & (gen > self.seen)):  # tag this call's tokens
            a, z = int(self.seen[slot]), int(gen[slot])
            self.tags[slot, a] = self.logit_version[slot]  # drawn from the logits the slot held on entry
            self.tags[slot, a + 1:z] = self.version
            self.logit_version[slot] = self.version
        seen_before, self.seen = self.seen, np.where(busy, gen, self.seen)
        done = np.flatnonzero(busy & ~live)
        done = done[np.argsort((gen - seen_before)[done], kind="stable")]  # in the order they ended in this call
        finished = []
        if done.size:
            width = min(self.spec.slots, 1 << int(np.ceil(np.log2(done.size))))  # few compiled sizes
            idx = np.concatenate([done, np.repeat(done[-1:], width - done.size)])
            tok, lp = (dist.to_host(x)[:done.size] for x in gather_rows(self.slots.tokens, self.slots.logprobs,
                                                                    self.engine.put(idx)))
            for j, slot in enumerate(done):
                (b, q), g = self.held[slot], int(gen[slot])
                bat = self.batches[b]
                bat.tokens[q], bat.logprobs[q], bat.mask[q, :g], bat.versions[q] = tok[j], lp[j], 1, self.tags[slot]
                st.generated += g
                st.handed_back.append((int(b), int(q)))
                bat.left -= 1
                if bat.left == 0:
                    finished.append(int(b))
            self.held[done] = -1
        return finished

    def take(self, b: int):
        """Finished batch `b` -> (Rollout (tokens [n, P+N], logprobs, mask [n, N], on the rows sharding),
        versions [n, N] int32 host array, -1 past each sequence's end)."""
        bat = self.batches.pop(b)
        if bat.left:
            raise OpdError(f"batch {b} still has {bat.left} sequences running")
        tokens = np.concatenate([np.repeat(bat.ids, self.group, 0), bat.tokens], 1)
        place = lambda a: self.engine.put(a, self.engine.rows(a))  # noqa: E731
        roll = Rollout(place(tokens), place(bat.logprobs), place(bat.mask), jnp.int32(self.stats.decode_steps))
        return roll, bat.versions, np.repeat(bat.pmask, self.group, 0)
