"""`Rollouts.collect(step, state) -> Batch`: a step's data, sampled by the student and scored by its teachers.

On-policy part: each prompt of the step repeated `group_size` times (a prompt's samples are
contiguous), completions sampled from the current student with the per-step key
fold_in(state.rng, step), rewards from the domains' verifiers when anything reads them, then each
teacher scores its rows (`RowLayout.groups`) and hands over what the estimator needs (hidden states
or sampled-token log-probs). Off-policy part (GKD, loss.lam < 1): the dataset answers, scored the
same way. The EffOPD probe and evaluation sample through the same object.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import distributed as dist
from opd_jax import sharding as shd
from opd_jax.errors import OpdError
from opd_jax.engine import Engine, EngineSpec
from opd_jax.evaluate import decode_completions, per_domain, rewards_for
from opd_jax.horizon import horizon_tokens, truncate
from opd_jax.layout import RowLayout
from opd_jax.losses.registry import uses_rl
from opd_jax.tasks import encode_pairs
from opd_jax.teachers import score_batch
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


@dataclass
class Batch:
    """arrays: {"on": part, "off": part} for the update (`train_step` docstring); examples: the
    on-policy rows' prompts (repeated per sample); texts / rewards: their decoded completions and
    verifier rewards (None when nothing read them this step); engine: the rollout engine's statistics."""

    arrays: dict
    examples: list = field(default_factory=list)
    texts: list | None = None
    rewards: np.ndarray | None = None
    engine: object = None  # the on-policy rollout's engine.EngineStats (occupancy, decode steps)
    metrics: dict = field(default_factory=dict)  # staleness, drops, cross-tokenizer statistics; asynchronous waits
    versions: np.ndarray | None = None  # the policy version of every sampled token [B, N]
    timeline: list | None = None  # asynchronous runs: (event, batch / version, time) of the pipeline so far

    def pop_xtok(self) -> "Batch":
        """Move the parts' cross-tokenizer statistics (not arrays the update takes) into the logged metrics."""
        for key, part in self.arrays.items():
            for k, v in (part.pop("_xtok", None) or {}).items():
                self.metrics[k if key == "on" else k.replace("xtok/", "xtok_off/")] = v
        return self


@dataclass(frozen=True)
class Rollouts:
    cfg: object
    graphdef: object
    mesh: object
    rules: dict
    rows: RowLayout
    prompter: object
    stop: tuple
    verifiers: dict
    teachers: dict
    estimator: object
    source: object
    model_cfg: object = None  # the student's ModelConfig (context length, vocabulary)
    rollout_rules: dict | None = None  # the layout the engine places the weights in (mesh.rollout_rules)
    sampler_mesh: object = None  # the sampler's devices (mesh.roles.sampler); None: the learner's mesh
    handover: str | None = None  # what the teachers hand over (losses.registry.handover); None: the estimator's
    progressive: object = None  # data.horizon_schedule=progressive: its horizon.ProgressiveHorizon (stateful)
    cross: bool = False  # some teacher scores in its own tokens (loss.cross_tokenizer): parts carry a loss_mask

    # ---------------------------------------------------------------- pieces
    def _global(self, x):
        """Host data (every process knows all of it) -> a global array with rows over the batch axes."""
        x = np.asarray(x)
        return dist.to_global(x, shd.rows_sharding(x.shape[0], x.ndim, self.mesh, self.rules))

    def engine(self, n_seq: int, temperature: float) -> Engine:
        """The rollout engine for `n_seq` sequences: data.rollout_slots slots (0 = one per sequence; at
        most n_seq), data settings, the rollout layout."""
        spec = EngineSpec.for_data(self.cfg.data, n_seq, temperature, stop=self.stop,
                                   pad_id=self.prompter.tokenizer.pad_token_id or 0)
        return Engine(self.graphdef, self.model_cfg, spec, self.sampler_mesh or self.mesh, self.rollout_rules)

    def sample(self, params, ids, pmask, key, *, group: int = 1, temperature=None):
        """`group` completions of each encoded prompt ids / pmask [n, P] from `params` (data settings;
        temperature 0 is greedy), one prefill per prompt. -> (sampling.Rollout, engine.EngineStats)."""
        t = self.cfg.data.temperature if temperature is None else temperature
        return self.engine(ids.shape[0] * group, t).run(params, ids, pmask, key, group=group)

    def score(self, tokens, prompt_mask, mask, what=None, *, examples=None, params=None, extras=None):
        """The teachers' hand-over for rows tokens [B, P+N] (prompt_mask [B, P], mask [B, N]). examples: the
        rows' examples (privileged and cross-tokenizer teachers build their own prompts from them); params:
        the student's current parameters (self_live teachers score with them). extras (a dict, optional)
        receives "loss_mask" [B, N] (host) and "xtok/..." statistics when a teacher scores in its own tokens."""
        what = what or self.handover or self.estimator.teacher_output
        full_mask = jnp.concatenate([prompt_mask, mask], 1)
        groups = self.rows.groups(tokens.shape[0])
        views = {name: self.privileged_view(name, idx, tokens, full_mask, examples)
                 for name, idx in groups.items() if getattr(self.teachers[name], "privileged", "")}
        cross = [n for n in groups if getattr(self.teachers[n], "cross", None) is not None]
        if cross:
            host_mask = dist.to_host(mask)  # the completions come to the host once, for every such teacher
            comp = dist.to_host(tokens)[:, self.cfg.data.max_prompt_len:]
            loss_mask = host_mask.astype(np.int32)
            stats = dict.fromkeys(("aligned", "tokens", "dropped", "truncated", "partial", "seconds"), 0.0)
            for name in cross:
                views[name] = self.cross_view(name, groups[name], comp, host_mask, examples, what, loss_mask, stats)
            if extras is not None:
                extras["loss_mask"] = loss_mask
                extras.update({"xtok/aligned_fraction": stats["aligned"] / max(stats["tokens"], 1.0),
                               "xtok/dropped_rows": stats["dropped"], "xtok/truncated_rows": stats["truncated"],
                               "xtok/partial_rows": stats["partial"], "xtok/align_seconds": stats["seconds"]})
        return score_batch(self.teachers, groups, tokens, full_mask, prompt_len=self.cfg.data.max_prompt_len,
                           temperature=self.cfg.data.temperature, what=what, topk=self.cfg.loss.topk, views=views,
                           live=params)

    def cross_view(self, name, idx, comp, mask, examples, what, loss_mask, stats):
        """(tokens [n, P_t + M], full mask, P_t, post) of cross-tokenizer teacher `name`'s rows `idx` (host
        completions comp [B, N], mask [B, N]): its
        prompt through its own template, the completion re-tokenized and aligned by bytes
        (`xtok_teacher.CrossView`); post brings its outputs to the student's positions: hidden states
        gathered at the aligned teacher positions, or log-probs summed per segment. Writes those rows'
        loss_mask (host [B, N]: aligned positions, or whole segments for log-probs) and adds to stats."""
        cv = self.teachers[name].cross
        if examples is None:
            raise OpdError(f"teacher {name!r} scores in its own tokens but the rows' examples were not given")
        if what not in ("hidden", "logprobs"):
            raise OpdError(f"teacher {name!r} scores in its own tokens, which hands over hidden states or log-probs, "
                           f"not {what!r}")
        rows = np.asarray(idx)
        comp, cmask = comp[rows], mask[rows]
        t0 = time.perf_counter()
        ids, fmask, al = cv.view([examples[i] for i in idx], comp, cmask)
        stats["seconds"] += time.perf_counter() - t0
        keep = al.aligned if what == "hidden" else al.whole
        loss_mask[rows] *= keep
        stats["aligned"] += float(np.sum(keep * cmask))
        stats["tokens"] += float(np.sum(cmask))
        for k in ("dropped", "truncated", "partial"):
            stats[k] += getattr(al, k)
        n_new = cmask.shape[1]
        if what == "hidden":
            gather = self._global(al.gather)
            post = lambda h: jnp.take_along_axis(h, gather[..., None], 1)  # noqa: E731
        else:
            seg = self._global(al.segment)

            def post(lp):
                out = jnp.zeros((lp.shape[0], n_new + 1), jnp.float32)
                return out.at[jnp.arange(lp.shape[0])[:, None], seg].add(lp)[:, :n_new]
        return self._global(ids), self._global(fmask), cv.p_len, post

    def privileged_view(self, name, idx, tokens, full_mask, examples):
        """(tokens [n, P_t + N], full mask, P_t) of teacher `name`'s rows `idx` as it sees them: its prompt
        is its template filled with each row's prompt and reference answer (P_t = data.max_privileged_len,
        left-padded), then the student's completion unchanged."""
        t, dc = self.teachers[name], self.cfg.data
        if examples is None:
            raise OpdError(f"teacher {name!r} is privileged but the rows' examples were not given")
        p_t = dc.max_privileged_len or 2 * dc.max_prompt_len
        rows = [examples[i] for i in idx]
        shown = []
        for ex in rows:
            if ex.answer is None and t.privileged == "answer":
                what = ex.prompt if ex.prompt is not None else ex.messages[-1][1]
                raise OpdError(f"teacher {name!r} is privileged (answer) but a {ex.domain!r} row has no answer: "
                               f"{what!r:.60}")
            if ex.messages is not None:  # the last user message carries the template
                (role, content), head = ex.messages[-1], ex.messages[:-1]
                ex = dataclasses.replace(ex, messages=head + ((role, t.template.format(prompt=content, answer=ex.answer or "")),))
            else:
                ex = dataclasses.replace(ex, prompt=t.template.format(prompt=ex.prompt, answer=ex.answer or ""))
            shown.append(ex)
        try:
            ids, pm = self.prompter.encode(shown, p_t)
        except OpdError as e:
            raise OpdError(f"teacher {name!r}'s privileged prompt: {e} (the privileged prompts' limit is "
                           f"data.max_privileged_len, now {p_t})") from None
        whole = list(idx) == list(range(tokens.shape[0]))
        take = (lambda x: x) if whole else (lambda x: x[np.asarray(idx)])
        p = dc.max_prompt_len
        tok = jnp.concatenate([self._global(ids), take(tokens)[:, p:]], 1)
        fm = jnp.concatenate([self._global(pm), take(full_mask)[:, p:]], 1)
        return tok, fm, p_t

    def horizon(self, step: int) -> int | None:
        """New tokens sampled at `step` (data.horizon, `opd_jax.horizon`); None: the whole max_new_tokens."""
        h = self.progressive.h if self.progressive is not None else horizon_tokens(self.cfg.data, step,
                                                                                   self.cfg.train.steps)
        return None if h == self.cfg.data.max_new_tokens else h

    def decode(self, tokens, mask) -> list[str]:
        return decode_completions(self.prompter.tokenizer, dist.to_host(tokens)[:, self.cfg.data.max_prompt_len:],
                                  dist.to_host(mask), self.stop)

    # ---------------------------------------------------------------- parts
    def sample_part(self, params, examples, key, *, timer: PhaseTimer = NO_TIMER, horizon: int | None = None):
        """Sample `examples` (one per prompt, group_size samples each, one prefill per prompt) from
        `params`; horizon: end every sequence at this many new tokens. -> (Rollout, host prompt mask
        [B, P] one row per sample, EngineStats)."""
        g = self.cfg.data.group_size
        ids, pmask = self.prompter.encode(examples, self.cfg.data.max_prompt_len)
        timer.mark("host")
        engine = self.engine(ids.shape[0] * g, self.cfg.data.temperature)
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
            roll = truncate(roll, self.cfg.data.max_prompt_len, horizon)
        rep = [ex for ex in examples for _ in range(self.cfg.data.group_size)]
        part, texts, rewards = self.complete(roll, pmask, rep, decode=decode, timer=timer, params=params)
        return part, rep, texts, rewards, stats

    def needs_texts(self, step: int) -> bool:
        """Whether step `step`'s batch brings its completions to the host (texts, verifier rewards): RL
        terms need rewards at every step, an evaluation step logs samples."""
        tc, done = self.cfg.train, step + 1
        return uses_rl(self.cfg.loss) or done % tc.eval_every == 0 or done == tc.steps

    def complete(self, roll, pmask, rep, *, decode: bool = True, timer: PhaseTimer = NO_TIMER, params=None):
        """The on-policy part from a finished rollout: pmask [B, P] (host, one row per sample), rep the
        examples per row; with `decode`, the completions' texts and verifier rewards; then the teachers'
        scores (params: the student's current parameters, for self_live teachers). -> (part, texts, rewards)."""
        if self.sampler_mesh is not None:  # sampled on the sampler's devices: the batch moves to the learner's
            roll = roll._replace(**{f: shd.placed(getattr(roll, f), shd.rows_sharding(
                getattr(roll, f).shape[0], getattr(roll, f).ndim, self.mesh, self.rules))
                for f in ("tokens", "logprobs", "mask")})
        texts = rewards = None
        if decode:
            texts = self.decode(roll.tokens, roll.mask)
            rewards = rewards_for(rep, texts, self.verifiers)
        pmask = self._global(pmask)
        part = {"tokens": roll.tokens, "prompt_mask": pmask, "mask": roll.mask, "sampler_logprobs": roll.logprobs,
                "rewards": self._global(np.zeros(len(rep), np.float32) if rewards is None else rewards)}
        timer.mark("host")
        extras = {}
        part["teacher"] = (timer.mark("teacher", self.score(roll.tokens, pmask, roll.mask, examples=rep, params=params,
                                                            extras=extras))
                           if self.teachers else self._global(np.zeros(roll.mask.shape, np.float32)))
        self._loss_mask(part, extras)
        return part, texts, rewards

    def _loss_mask(self, part, extras):
        """Cross-tokenizer runs: the part's loss mask (the positions the teachers' hand-over covers) and the
        alignment statistics (kept in the part under "_xtok", taken out before the update)."""
        if self.cross:
            lm = extras.get("loss_mask", dist.to_host(part["mask"]))
            part["loss_mask"] = self._global(np.asarray(lm, np.int32))
            part["_xtok"] = {k: v for k, v in extras.items() if k.startswith("xtok/")}

    def off_policy(self, examples, *, timer: PhaseTimer = NO_TIMER, params=None) -> dict:
        """The dataset-answer part (GKD): prompt + answer rows, scored by the teachers."""
        if any(e.answer is None for e in examples):
            raise OpdError("loss.lam < 1 needs dataset answers, but some prompts have no 'answer'")
        dc = self.cfg.data
        tokens, pmask, amask = (self._global(x) for x in encode_pairs(
            self.prompter, examples, [e.answer for e in examples], dc.max_prompt_len, dc.max_new_tokens))
        timer.mark("host")
        extras = {}
        teacher = timer.mark("teacher", self.score(tokens, pmask, amask, examples=examples, params=params,
                                                   extras=extras))
        part = {"tokens": tokens, "prompt_mask": pmask, "mask": amask, "teacher": teacher}
        self._loss_mask(part, extras)
        return part

    def collect(self, step: int, state, *, decode: bool | None = None, timer: PhaseTimer = NO_TIMER) -> Batch:
        """Step `step`'s batch for the update: its prompts (data position `step`), sampled from
        state.params with fold_in(state.rng, step), then `finish` (decode: None = `needs_texts(step)`)."""
        examples = self.source.batch(step, self.cfg.data.per_domain)
        roll = pmask = stats = None
        if "on" in self.rows.parts:
            key = jax.random.fold_in(state.key(), step)
            roll, pmask, stats = self.sample_part(state.params, examples, key, timer=timer, horizon=self.horizon(step))
        return self.finish(step, examples, roll, pmask, stats, params=state.params, decode=decode, timer=timer)

    def finish(self, step: int, examples, roll, pmask, stats, *, params, versions=None, decode: bool | None = None,
               timer: PhaseTimer = NO_TIMER) -> Batch:
        """Step `step`'s batch from its finished rollout: the one batch path of the synchronous `collect`
        and the asynchronous pipeline. roll: the rollout of `examples` x group_size (None without an
        on-policy part), pmask [B, P] its host prompt mask, stats its EngineStats; versions [B, N]: the
        policy version of every token (default: all `step`, a synchronous step). In order: cut to the
        step's horizon; a sequence more than train.max_staleness versions old is dropped (mask zeroed);
        texts and verifier rewards when `decode` (None: `needs_texts(step)`); the teachers' scores
        (params: the student's current parameters, for self_live teachers); the off-policy part;
        staleness and cross-tokenizer statistics into `Batch.metrics`."""
        batch = Batch({})
        if roll is not None:
            h = self.horizon(step)
            if h is not None:
                roll = truncate(roll, self.cfg.data.max_prompt_len, h)
            k = self.cfg.train.max_staleness
            if versions is None:  # a synchronous step: every token is this step's (no mask read back)
                versions, stale = np.full(roll.mask.shape, step), np.zeros(roll.mask.shape[0], np.int64)
            else:
                versions = np.asarray(versions)[:, :roll.mask.shape[1]]
                mask = dist.to_host(roll.mask)
                stale = staleness(versions, mask, step)
                if (stale > k).any():
                    roll = roll._replace(mask=self._global(mask * (stale <= k)[:, None]))
            drop = stale > k
            batch.examples = [ex for ex in examples for _ in range(self.cfg.data.group_size)]
            batch.arrays["on"], batch.texts, batch.rewards = self.complete(
                roll, pmask, batch.examples, decode=self.needs_texts(step) if decode is None else decode, timer=timer,
                params=params)
            batch.engine, batch.versions = stats, versions
            batch.metrics.update(staleness_histogram(stale, k), **{"rollout/dropped": float(drop.sum()),
                                                                    "rollout/staleness_mean": float(stale.mean())})
        if "off" in self.rows.parts:
            batch.arrays["off"] = self.off_policy(examples, timer=timer, params=params)
        return batch.pop_xtok()

    # ---------------------------------------------------------------- probe and evaluation
    def probe_batch(self, params, examples, key) -> dict:
        """Completions of `examples` (one each) sampled from `params` with `key`, with the teachers'
        hidden states: the fixed batch the EffOPD guard scores candidate parameters on."""
        ids, pmask = self.prompter.encode(examples, self.cfg.data.max_prompt_len)
        roll, _ = self.sample(params, ids, pmask, key)
        pmask = self._global(pmask)
        return {"tokens": roll.tokens, "prompt_mask": pmask, "mask": roll.mask,
                "teacher": self.score(roll.tokens, pmask, roll.mask, what="hidden", examples=examples, params=params)}

    def evaluate(self, params, examples):
        """Greedy completions of `examples`, scored by the verifiers -> ({domain: accuracy, "mean"},
        texts, rewards)."""
        ids, pmask = self.prompter.encode(examples, self.cfg.data.max_prompt_len)
        roll, _ = self.sample(params, ids, pmask, jax.random.key(0), temperature=0.0)
        texts = self.decode(roll.tokens, roll.mask)
        rewards = rewards_for(examples, texts, self.verifiers)
        return per_domain(examples, rewards), texts, rewards
