"""`Rollouts.collect(step, state) -> Batch`: a step's data, sampled by the student and scored by its teachers.

On-policy part: each prompt of the step repeated `group_size` times (a prompt's samples are
contiguous), completions sampled from the current student with the per-step key
fold_in(state.rng, step), rewards from the domains' verifiers when anything reads them, then each
teacher scores its rows (`RowLayout.groups`) and hands over what the estimator needs (hidden states
or sampled-token log-probs). Off-policy part (GKD, loss.lam < 1): the dataset answers, scored the
same way. The EffOPD probe and evaluation sample through the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import distributed as dist
from opd_jax import sharding as shd
from opd_jax.errors import OpdError
from opd_jax.engine import Engine, EngineSpec
from opd_jax.evaluate import decode_completions, per_domain, rewards_for
from opd_jax.hooks import stop_metrics
from opd_jax.horizon import horizon_tokens, truncate
from opd_jax.layout import RowLayout
from opd_jax.losses.registry import uses_rl
from opd_jax.tasks import encode_pairs
from opd_jax.batch import Batch, Part
from opd_jax.teachers import Rows, score_batch
from opd_jax.xtok_teacher import xtok_metrics
from opd_jax.timing import NO_TIMER, PhaseTimer

PROBE_STREAM, EVAL_STREAM = 2, 1  # prompt streams held out from training (stream 0)


def staleness(versions, mask, step: int) -> np.ndarray:
    """Per sequence: step - the oldest version among its real tokens. versions, mask [B, N] -> [B] int
    (0 for a sequence without tokens)."""
    v = np.where(np.asarray(mask) > 0, np.asarray(versions), np.iinfo(np.int32).max)
    oldest = v.min(1)
    return np.where(oldest == np.iinfo(np.int32).max, 0, step - oldest).astype(np.int64)


def staleness_histogram(stale, k: int, keys: int = 4) -> dict:
    """Sequences per staleness, as a handful of metric keys whatever k is: rollout/staleness_i for
    i < min(k, keys), and the last key counting every staleness from there to k (`staleness_K` when
    that is k itself, else `staleness_{i}plus`); sequences staler than k are dropped, not counted here."""
    top, stale = min(k, keys), np.asarray(stale)
    hist = np.bincount(np.minimum(stale[stale <= k], top), minlength=top + 1)[:top + 1]  # past k: rollout/dropped
    out = {f"rollout/staleness_{i}": float(c) for i, c in enumerate(hist[:top])}
    out[f"rollout/staleness_{top}" + ("plus" if top < k else "")] = float(hist[top])
    return out


@dataclass(frozen=True)
class Rollouts:
    data: object  # config sections: data (prompts, lengths, sampling, horizon)
    loss: object  # loss (topk, whether rewards are read)
    train: object  # train (steps, eval_every, max_staleness)
    graphdef: object
    mesh: object
    rules: dict
    rows: RowLayout
    prompter: object
    stop: tuple
    verifiers: dict
    teachers: dict
    source: object
    model_cfg: object = None  # the student's ModelConfig (context length, vocabulary)
    rollout_rules: dict | None = None  # the layout the engine places the weights in (mesh.rollout_rules)
    sampler_mesh: object = None  # the sampler's devices (mesh.roles.sampler); None: the learner's mesh
    handover: str = "logprobs"  # what the teachers hand over (StepSpec.handover, losses.registry.handover)
    progressive: object = None  # data.horizon_schedule=progressive: its horizon.ProgressiveHorizon (state: TrainState.horizon)
    cross: bool = False  # some teacher scores in its own tokens (loss.cross_tokenizer): parts carry a loss_mask
    pack_unit: tuple = (1, 1)  # data.pack_tokens: (row unit, batch shards), `update_compile.pack_unit`
    _engines: dict = field(default_factory=dict, compare=False, repr=False)  # (n_seq, temperature) -> Engine

    # ---------------------------------------------------------------- pieces
    def _global(self, x):
        """Host data (every process knows all of it) -> a global array with rows over the batch axes."""
        x = np.asarray(x)
        return dist.to_global(x, shd.rows_sharding(x.shape[0], x.ndim, self.mesh, self.rules))

    def engine(self, n_seq: int, temperature: float) -> Engine:
        """The rollout engine for `n_seq` sequences: data.rollout_slots slots (0 = one per sequence; at
        most n_seq), data settings, the rollout layout. One engine per (n_seq, temperature), kept (it keeps
        the weights' rollout shardings)."""
        if (n_seq, temperature) not in self._engines:
            spec = EngineSpec.for_data(self.data, n_seq, temperature, stop=self.stop,
                                       pad_id=self.prompter.tokenizer.pad_token_id or 0)
            self._engines[n_seq, temperature] = Engine(self.graphdef, self.model_cfg, spec,
                                                       self.sampler_mesh or self.mesh, self.rollout_rules)
        return self._engines[n_seq, temperature]

    def sample(self, params, ids, pmask, key, *, group: int = 1, temperature=None):
        """`group` completions of each encoded prompt ids / pmask [n, P] from `params` (data settings;
        temperature 0 is greedy), one prefill per prompt. -> (sampling.Rollout, engine.EngineStats)."""
        t = self.data.temperature if temperature is None else temperature
        return self.engine(ids.shape[0] * group, t).run(params, ids, pmask, key, group=group)

    def score(self, tokens, prompt_mask, mask, what=None, *, examples=None, params=None):
        """The teachers' hand-over for rows tokens [B, P+N] (prompt_mask [B, P], mask [B, N]): each teacher
        scores its rows (`RowLayout.groups`, `teachers.score_batch`). examples: the rows' examples
        (privileged and cross-tokenizer teachers build their own prompts from them); params: the student's
        current parameters (self_live teachers score with them). -> teachers.Scored (keep: the loss mask
        when a teacher scores in its own tokens; stats: its alignment statistics)."""
        what = what or self.handover
        rows = Rows(tokens, jnp.concatenate([prompt_mask, mask], 1), self.data.max_prompt_len, examples, params,
                    self._global)
        return score_batch(self.teachers, self.rows.groups(tokens.shape[0]), rows, what=what,
                           temperature=self.data.temperature, topk=self.loss.topk)

    def horizon(self, step: int, state=None) -> int | None:
        """New tokens sampled at `step` (data.horizon, `opd_jax.horizon`; a progressive schedule reads
        state.horizon); None: the whole max_new_tokens."""
        if self.progressive is not None:
            if state is None or state.horizon is None:
                raise OpdError("data.horizon_schedule=progressive: the step's horizon needs the TrainState")
            h = self.progressive.h(dist.to_host(state.horizon))
        else:
            h = horizon_tokens(self.data, step, self.train.steps)
        return None if h == self.data.max_new_tokens else h

    def decode(self, tokens, mask) -> list[str]:
        return decode_completions(self.prompter.tokenizer, dist.to_host(tokens)[:, self.data.max_prompt_len:],
                                  dist.to_host(mask), self.stop)

    # ---------------------------------------------------------------- parts
    def sample_part(self, params, examples, key, *, timer: PhaseTimer = NO_TIMER, horizon: int | None = None):
        """Sample `examples` (one per prompt, group_size samples each, one prefill per prompt) from
        `params`; horizon: end every sequence at this many new tokens. -> (Rollout, host prompt mask
        [B, P] one row per sample, EngineStats)."""
        g = self.data.group_size
        ids, pmask = self.prompter.encode(examples, self.data.max_prompt_len)
        timer.mark("host")
        engine = self.engine(ids.shape[0] * g, self.data.temperature)
        placed = timer.mark("weight_sync", engine.place(params))  # learner -> sampler layout (and devices)
        caps = None if horizon is None else np.full(ids.shape[0] * g, horizon, np.int32)
        roll, stats = engine.run(placed, ids, pmask, key, group=g, caps=caps)
        timer.mark("sample", roll)
        return roll, np.repeat(pmask, g, 0), stats

    def on_policy(self, params, examples, key, *, decode: bool = True, timer: PhaseTimer = NO_TIMER,
                  horizon: int | None = None):
        """The sampled part for `examples` alone (no step: tests and experiments); `finish` builds a
        step's batch. -> (part, repeated examples, texts, rewards, EngineStats)."""
        roll, pmask, stats = self.sample_part(params, examples, key, timer=timer, horizon=horizon)
        if horizon is not None:
            roll = truncate(roll, self.data.max_prompt_len, horizon)
        rep = [ex for ex in examples for _ in range(self.data.group_size)]
        part, texts, rewards, _ = self.complete(roll, pmask, rep, decode=decode, timer=timer, params=params)
        return part, rep, texts, rewards, stats

    def needs_texts(self, step: int) -> bool:
        """Whether step `step`'s batch brings its completions to the host (texts, verifier rewards): RL
        terms need rewards at every step, an evaluation step logs samples."""
        tc, done = self.train, step + 1
        return uses_rl(self.loss) or done % tc.eval_every == 0 or done == tc.steps

    def complete(self, roll, pmask, rep, *, decode: bool = True, timer: PhaseTimer = NO_TIMER, params=None):
        """The on-policy part from a finished rollout: pmask [B, P] (host, one row per sample), rep the
        examples per row; with `decode`, the completions' texts and verifier rewards; then the teachers'
        scores (params: the student's current parameters, for self_live teachers). -> (part, texts, rewards,
        metrics)."""
        if self.sampler_mesh is not None:  # sampled on the sampler's devices: the batch moves to the learner's
            roll = roll._replace(**{f: shd.placed(getattr(roll, f), shd.rows_sharding(
                getattr(roll, f).shape[0], getattr(roll, f).ndim, self.mesh, self.rules))
                for f in ("tokens", "logprobs", "mask")})
        texts = rewards = None
        if decode:
            texts = self.decode(roll.tokens, roll.mask)
            rewards = rewards_for(rep, texts, self.verifiers)
        pmask = self._global(pmask)
        part = Part(roll.tokens, pmask, roll.mask, sampler_logprobs=roll.logprobs,
                    rewards=self._global(np.zeros(len(rep), np.float32) if rewards is None else rewards))
        timer.mark("host")
        packing = {}
        if self.data.pack_tokens:  # what the Logger reads from a padded part, before the rows are packed
            packing = {**stop_metrics(roll.tokens, roll.mask, self.stop), "rollout/horizon": int(roll.mask.shape[1])}
        part, metrics = self._scored(part, rep, params, timer)
        return part, texts, rewards, {**metrics, **packing}

    def _pack(self, part: Part, name: str) -> tuple[Part, tuple, dict]:
        """data.pack_tokens: the part's sequences packed end to end (`opd_jax.packing`; host-side, so the
        masks come to the host every step) in rows rounded as `packing.packed_rows` says -> (packed
        part, where each completion slot went, metrics)."""
        from opd_jax.packing import packed_part, packed_rows

        host = Part(*(None if x is None else dist.to_host(x) for x in
                      (part.tokens, part.prompt_mask, part.mask, None, part.sampler_logprobs, part.rewards,
                       part.loss_mask)))
        blocks = len(self.rows.domains)  # each domain (one teacher's rows) packed on its own, equal blocks
        r = host.tokens.shape[0] // blocks
        packed, fraction, where = packed_part(host, self.data.pack_tokens, blocks=blocks,
                                              normalize=self.loss.normalize, pad_id=self.prompter.tokenizer.pad_token_id or 0,
                                              rows=lambda need: packed_rows(need, r, blocks, *self.pack_unit))
        key = "update/real_token_fraction" + ("" if name == "on" else "_off")
        return jax.tree.map(self._global, packed), where, {key: fraction}

    def _scatter(self, out, where, n: int, grid: tuple):
        """A hand-over scored on the n padded rows -> the packed rows' [R, L - 1] grid (`packing.scatter_tokens`;
        hidden states: each teacher's own rows of both layouts)."""
        from opd_jax.packing import scatter_tokens

        if not isinstance(out, dict):
            return jax.tree.map(lambda x: self._global(scatter_tokens(where, dist.to_host(x), grid)), out)
        padded, packed = self.rows.groups(n), self.rows.groups(grid[0])
        moved = {}
        for name, x in out.items():
            idx, local = np.asarray(padded[name]), np.full(grid[0], -1, np.int64)
            local[np.asarray(packed[name])] = np.arange(len(packed[name]))
            wr, wc = where[0][idx], where[1][idx]
            moved[name] = self._global(scatter_tokens((np.where(wr >= 0, local[wr], -1), wc), dist.to_host(x),
                                                      (len(packed[name]), grid[1])))
        return moved

    def _scored(self, part: Part, examples, params, timer: PhaseTimer, prefix: str = "xtok", name: str = "on"):
        """`part` with its teachers' hand-over (and, across tokenizers, its loss mask) -> (part, metrics).
        With data.pack_tokens the part is packed: local teachers then score the packed rows; a teacher that
        reads its own tokens or prompt, or scores over HTTP (`Teacher.packs` False), scores the padded rows
        and its hand-over moves to the packed positions."""
        pack = bool(self.data.pack_tokens)
        if not self.teachers:  # nothing scores: zeros of the mask's shape (pure reward RL)
            part, _, metrics = self._pack(part, name) if pack else (part, None, {})
            return part._replace(teacher=self._global(np.zeros(part.mask.shape, np.float32))), metrics
        if pack and all(t.packs for t in self.teachers.values()):
            part, _, metrics = self._pack(part, name)
            rows = Rows(part.tokens, part.segments, 1, examples, params, self._global, packed=True)
            scored = timer.mark("teacher", score_batch(self.teachers, self.rows.groups(part.tokens.shape[0]), rows,
                                                       what=self.handover, temperature=self.data.temperature,
                                                       topk=self.loss.topk))
            return part._replace(teacher=scored.out), metrics
        scored = timer.mark("teacher", self.score(part.tokens, part.prompt_mask, part.mask, examples=examples,
                                                  params=params))
        if self.cross:
            keep = scored.keep if scored.keep is not None else dist.to_host(part.mask)
            part = part._replace(loss_mask=self._global(np.asarray(keep, np.int32)))
        metrics = xtok_metrics(scored.stats, prefix)
        if pack:
            n = part.tokens.shape[0]
            part, where, packed = self._pack(part, name)
            return part._replace(teacher=self._scatter(scored.out, where, n, part.mask.shape)), {**metrics, **packed}
        return part._replace(teacher=scored.out), metrics

    def off_policy(self, examples, *, timer: PhaseTimer = NO_TIMER, params=None) -> tuple[Part, dict]:
        """The dataset-answer part (GKD): prompt + answer rows, scored by the teachers. -> (part, metrics)."""
        if any(e.answer is None for e in examples):
            raise OpdError("loss.lam < 1 needs dataset answers, but some prompts have no 'answer'")
        dc = self.data
        tokens, pmask, amask = (self._global(x) for x in encode_pairs(
            self.prompter, examples, [e.answer for e in examples], dc.max_prompt_len, dc.max_new_tokens))
        timer.mark("host")
        return self._scored(Part(tokens, pmask, amask), examples, params, timer, prefix="xtok_off", name="off")

    def collect(self, step: int, state, *, decode: bool | None = None, timer: PhaseTimer = NO_TIMER) -> Batch:
        """Step `step`'s batch for the update: its prompts (data position `step`), sampled from
        state.params with fold_in(state.rng, step), then `finish` (decode: None = `needs_texts(step)`)."""
        examples = self.source.batch(step, self.data.per_domain)
        roll = pmask = stats = None
        h = self.horizon(step, state)
        if "on" in self.rows.parts:
            key = jax.random.fold_in(state.key(), step)
            roll, pmask, stats = self.sample_part(state.params, examples, key, timer=timer, horizon=h)
        return self.finish(step, examples, roll, pmask, stats, params=state.params, horizon=h, decode=decode,
                           timer=timer)

    def finish(self, step: int, examples, roll, pmask, stats, *, params, horizon: int | None = None, versions=None,
               decode: bool | None = None, timer: PhaseTimer = NO_TIMER) -> Batch:
        """Step `step`'s batch from its finished rollout: the one batch path of the synchronous `collect`
        and the asynchronous pipeline. roll: the rollout of `examples` x group_size (None without an
        on-policy part), pmask [B, P] its host prompt mask, stats its EngineStats; versions [B, N]: the
        policy version of every token (default: all `step`, a synchronous step). In order: cut to the
        step's horizon (`horizon` new tokens; None: uncut); a sequence more than train.max_staleness versions old is dropped (mask zeroed);
        texts and verifier rewards when `decode` (None: `needs_texts(step)`); the teachers' scores
        (params: the student's current parameters, for self_live teachers); the off-policy part;
        staleness and cross-tokenizer statistics into `Batch.metrics`."""
        batch = Batch({})
        if roll is not None:
            if horizon is not None:
                roll = truncate(roll, self.data.max_prompt_len, horizon)
            k = self.train.max_staleness
            if versions is None:  # a synchronous step: every token is this step's (no mask read back)
                versions, stale = np.full(roll.mask.shape, step), np.zeros(roll.mask.shape[0], np.int64)
            else:
                versions = np.asarray(versions)[:, :roll.mask.shape[1]]
                mask = dist.to_host(roll.mask)
                stale = staleness(versions, mask, step)
                if (stale > k).any():
                    roll = roll._replace(mask=self._global(mask * (stale <= k)[:, None]))
            drop = stale > k
            batch.examples = [ex for ex in examples for _ in range(self.data.group_size)]
            batch.arrays["on"], batch.texts, batch.rewards, xtok = self.complete(
                roll, pmask, batch.examples, decode=self.needs_texts(step) if decode is None else decode, timer=timer,
                params=params)
            batch.engine, batch.versions = stats, versions
            batch.metrics.update(xtok)
            batch.metrics.update(staleness_histogram(stale, k), **{"rollout/dropped": float(drop.sum()),
                                                                    "rollout/staleness_mean": float(stale.mean())})
        if "off" in self.rows.parts:
            batch.arrays["off"], xtok = self.off_policy(examples, timer=timer, params=params)
            batch.metrics.update(xtok)
        return batch

    # ---------------------------------------------------------------- probe and evaluation
    def probe_batch(self, params, examples, key) -> Part:
        """Completions of `examples` (one each) sampled from `params` with `key`, with the teachers'
        hidden states: the fixed batch the EffOPD guard scores candidate parameters on."""
        ids, pmask = self.prompter.encode(examples, self.data.max_prompt_len)
        roll, _ = self.sample(params, ids, pmask, key)
        pmask = self._global(pmask)
        return Part(roll.tokens, pmask, roll.mask, self.score(roll.tokens, pmask, roll.mask, what="hidden",
                                                              examples=examples, params=params).out)

    def evaluate(self, params, examples):
        """Greedy completions of `examples`, scored by the verifiers -> ({domain: accuracy, "mean"},
        texts, rewards)."""
        ids, pmask = self.prompter.encode(examples, self.data.max_prompt_len)
        roll, _ = self.sample(params, ids, pmask, jax.random.key(0), temperature=0.0)
        texts = self.decode(roll.tokens, roll.mask)
        rewards = rewards_for(examples, texts, self.verifiers)
        return per_domain(examples, rewards), texts, rewards
