"""Asynchronous OPD: the sampler generates (and the teachers score) the next batches while the learner
updates, with a bound k = train.max_staleness on how old a sampled token may be.

    pipe = Pipeline(run, state, start=s, end=e)   # starts the sampler thread; publishes version s
    for step in range(s, e):
        batch = pipe.take(step)                   # waits for batch `step` (time/rollout_wait)
        state, metrics = run.update(state, batch.arrays, run.teacher_w)
        pipe.publish(step + 1, state.params)      # the weight sync: learner -> sampler (time/weight_sync)
    pipe.close()

Versions: the parameters after u updates are version u. Every sampled token carries the version that
produced its logits (`opd_jax.stream`). The sampler thread runs one `Stream` (persistent slots):

    before the first sequence of batch b starts, the stream takes version max(s, b - k)
    (waiting for the learner if it has not published it: time/learner_wait), and batch b may only
    start once batch b - k - 1 has finished (so the learner can always make progress).

Every token of batch b is therefore at most k versions older than the update that consumes it, and
batch b+1's sequences take the slots batch b's early finishers free (partial rollouts: a sequence
that is still running when the weights change continues under the new ones). The schedule is fixed
by the step numbers alone, not by timing: a run is reproducible, and with k = 0 it is exactly the
synchronous loop (the trainer keeps k = 0 on `Rollouts.collect`). At the update, a sequence whose
oldest token is more than k versions old is dropped (its mask zeroed, counted in
rollout/dropped); the schedule above never produces one, so a non-zero count means a bug or a
sampler driven by hand. Sampled-token and RL terms keep their PPO clip against the sampler's log-probs
with the ratio truncated at `loss.is_cap`; the exact and top-k divergences are recomputed under the
current student at every position (docs/math.md, "Asynchronous training").

Resuming: the checkpoint is the learner's state; batches in flight are not saved, so the first k
batches after a resume are sampled by the resumed version (fresher than in the uninterrupted run).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import distributed as dist
from opd_jax.errors import OpdError
from opd_jax.preemption import STOP, StepAbandoned
from opd_jax.batch import Batch
from opd_jax.stream import Stream


def copy_params(params, shardings=None):
    """A copy of `params` the next update's donation cannot delete: on `shardings` (another device
    set or layout) when given, else in place."""
    if shardings is not None:
        return jax.device_put(params, shardings, donate=False, may_alias=False)
    return jax.tree.map(jnp.copy, params)


class Pipeline:
    """The sampler thread and the learner's side of it (see the module docstring)."""

    def __init__(self, run, state, *, start: int, end: int, rollouts=None):
        self.run, self.ro = run, rollouts or run.rollouts
        self.k, self.start, self.end = run.cfg.train.max_staleness, start, end
        if self.k < 1:
            raise OpdError("the asynchronous pipeline needs train.max_staleness >= 1")
        dc = run.cfg.data
        self.group = dc.group_size
        self.n_seq = self.ro.rows.rows("on")
        self.engine = self.ro.engine(self.n_seq, dc.temperature)
        self.sampler_sh = self.engine.shardings(state.params)  # the rollout layout (None without a mesh)
        self.key = jax.random.wrap_key_data(jnp.asarray(dist.to_host(state.rng)))  # the state is donated
        self.cv = threading.Condition()
        self.versions: dict = {}  # version -> parameters on the sampler's devices
        self.ready: dict = {}  # batch -> Batch
        self.finished: set = set()
        self.error: BaseException | None = None
        self.stopping = False
        self.sync_s = self.learner_wait_s = 0.0
        self.timeline: list = []  # (event, batch or version, perf_counter): started / ready / taken / published
        self.publish(start, state.params)
        self.thread = threading.Thread(target=self._loop, name="opd-sampler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ learner side
    def publish(self, version: int, params):
        """Hand version `version` of the parameters to the sampler (a copy in the rollout layout, made
        before the next update donates `params`). Its wall time is time/weight_sync."""
        jax.block_until_ready(params)  # the update that made them (not part of the sync)
        t0 = time.perf_counter()
        copy = copy_params(params, self.sampler_sh)
        jax.block_until_ready(copy)
        self.sync_s = time.perf_counter() - t0
        with self.cv:
            self.versions[version] = copy
            self.timeline.append(("published", version, time.perf_counter()))
            self.cv.notify_all()

    def take(self, step: int) -> Batch:
        """Batch `step`, waiting for the sampler; its metrics in Batch.metrics."""
        t0 = time.perf_counter()
        with self.cv:
            while step not in self.ready and self.error is None:
                if STOP.is_set():  # SIGTERM: the sampler may be waiting on a served teacher
                    raise StepAbandoned(f"SIGTERM while waiting for batch {step}")
                self.cv.wait(0.1)
            if self.error is not None:
                raise self.error
            batch = self.ready.pop(step)
            self.timeline.append(("taken", step, time.perf_counter()))
            self.cv.notify_all()
        batch.timeline = self.timeline  # the whole run's, shared (tests and benchmarks read the overlap)
        batch.metrics["time/rollout_wait"] = time.perf_counter() - t0
        batch.metrics["time/weight_sync"] = self.sync_s
        batch.metrics["time/learner_wait"], self.learner_wait_s = self.learner_wait_s, 0.0
        return batch

    def close(self):
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.thread.join(timeout=60)

    # ------------------------------------------------------------------ sampler side
    def _version(self, v: int):
        """Wait for version v (the learner publishes it after update v - 1) and drop older copies."""
        t0 = time.perf_counter()
        with self.cv:
            while v not in self.versions and not self.stopping:
                self.cv.wait(0.5)
            if self.stopping:
                return None
            params = self.versions[v]
            for old in [u for u in self.versions if u < v]:
                del self.versions[old]
        self.learner_wait_s += time.perf_counter() - t0
        return params

    def _loop(self):
        try:
            self._sample()
        except BaseException as e:  # handed to the learner at its next take
            with self.cv:
                if isinstance(e, (OpdError, StepAbandoned)):
                    self.error = e
                else:
                    self.error = OpdError(f"the sampler thread failed: {e!r}")
                    self.error.__cause__ = e
                self.cv.notify_all()

    def sampler_version(self, b: int) -> int:
        """The version that samples batch b (from its first sequence on): max(start, b - k)."""
        return max(self.start, b - self.k)

    def _may_start(self, b: int) -> bool:
        return b < self.end and (b - self.k - 1 < self.start or b - self.k - 1 in self.finished)

    def _sample(self):
        stream = Stream(self.engine, self.group)
        self.stream, self._stats = stream, dataclasses.replace(stream.stats, handed_back=[])
        nxt = self.start
        while not self.stopping:
            if not stream.queue and self._may_start(nxt):
                v = self.sampler_version(nxt)
                if stream.version != v:
                    params = self._version(v)
                    if params is None:
                        return
                    stream.set_params(params, v)
                examples = self.ro.source.batch(nxt, self.run.cfg.data.per_domain)
                ids, pmask = self.ro.prompter.encode(examples, self.run.cfg.data.max_prompt_len)
                h = self.ro.horizon(nxt)
                stream.add(nxt, ids, pmask, jax.random.fold_in(self.key, nxt),
                           caps=None if h is None else np.full(ids.shape[0] * self.group, h, np.int32))
                self.timeline.append(("started", nxt, time.perf_counter()))
                stream.batches[nxt].examples, stream.batches[nxt].horizon = examples, h
                nxt += 1
                continue
            if not stream.live and not stream.queue:
                if nxt >= self.end:
                    return
                with self.cv:  # nothing to run until the learner publishes a version
                    self.cv.wait(0.05)
                continue
            for b in stream.advance():
                self._finish(stream, b)

    def _finish(self, stream: Stream, b: int):
        examples, h = stream.batches[b].examples, stream.batches[b].horizon
        roll, versions, pmask = stream.take(b)
        now = dataclasses.replace(stream.stats, handed_back=[])  # the stream's statistics since the last batch
        stats = dataclasses.replace(now, **{f: getattr(now, f) - getattr(self._stats, f) for f in (
            "decode_steps", "generated", "dispatches", "prefill_rows", "queued_steps", "queued_generated")})
        self._stats = now
        batch = self.ro.finish(b, examples, roll, pmask, stats, params=stream.params,
                               horizon=h, versions=versions)
        with self.cv:
            self.finished.add(b)
            self.ready[b] = batch
            self.timeline.append(("ready", b, time.perf_counter()))
            self.cv.notify_all()
