"""Rollout-horizon control: sample (and score, and train on) only the first h tokens of each completion.

    data.horizon           a fraction of data.max_new_tokens in (0, 1], or a token count >= 2
    data.horizon_schedule  fixed: h from data.horizon at every step
                           linear: from data.horizon at step 0 to the whole max_new_tokens at the last step
                           progressive: from data.horizon, one bucket longer whenever the teacher divergence
                           stops falling (the POPD rule; `ProgressiveHorizon` below)
    data.horizon_window    progressive: steps per comparison window (w)

h is rounded up to one of at most 8 lengths, ceil(N * j / 8) for j = 1..8 (N = max_new_tokens), so at
most 8 update programs are ever compiled (`UpdatePrograms`: one per length, compiled when first used;
the fit check compiled the longest). The engine ends every sequence at h (its length cap), so
decoding stops there; the batch is cut to [B, P + h] before the teachers score it.

A truncated row has no ending: the loss covers its sampled prefix only. Token-level estimators are
unchanged. Sequence-level ones (reward-to-go over the prefix) estimate the divergence of the first h
tokens' joint distribution, a well-defined objective. Verifier rewards have no meaning on an
unfinished answer, so RL terms with h < N are refused.
"""

from __future__ import annotations

import math

import numpy as np

from opd_jax.errors import OpdError

SCHEDULES = ("fixed", "linear", "progressive")
MAX_BUCKETS = 8


def buckets(n_new: int) -> tuple[int, ...]:
    """The static completion lengths a horizon may take: ceil(N j / 8), j = 1..8 (at most 8)."""
    return tuple(sorted({math.ceil(n_new * j / MAX_BUCKETS) for j in range(1, MAX_BUCKETS + 1)}))


def _raw(value: float, n_new: int) -> int:
    return math.ceil(value * n_new) if value <= 1 else int(value)


def check_horizon(cfg):
    """One-line errors for a horizon no run can honour (before anything is read)."""
    dc = cfg.data
    h = dc.horizon
    if not (0 < h <= 1 or (h >= 2 and float(h).is_integer())):
        raise OpdError(f"config data.horizon must be a fraction in (0, 1] of max_new_tokens or a token count >= 2, "
                       f"got {h!r}")
    if h > 1 and h > dc.max_new_tokens:
        raise OpdError(f"config data.horizon {int(h)} exceeds data.max_new_tokens {dc.max_new_tokens}")
    if dc.horizon_schedule not in SCHEDULES:
        raise OpdError(f"config data.horizon_schedule must be one of {SCHEDULES}, got {dc.horizon_schedule!r}")
    from opd_jax.losses.registry import uses_rl

    truncating = _raw(h, dc.max_new_tokens) < dc.max_new_tokens
    if dc.horizon_schedule == "progressive":
        if dc.horizon_window < 1:
            raise OpdError(f"config data.horizon_window must be >= 1, got {dc.horizon_window}")
        if cfg.train.max_staleness:
            raise OpdError("data.horizon_schedule=progressive needs synchronous training (train.max_staleness: 0): "
                           "its next horizon depends on the step just trained, which a pipelined sampler has not seen")
    if truncating and uses_rl(cfg.loss):
        raise OpdError("data.horizon < max_new_tokens cuts answers before they end, so verifier rewards "
                       "(loss.rl_alpha < 1 or rl_mode=replace) have nothing to judge; use the whole horizon")


def horizon_tokens(dc, step: int, steps: int) -> int:
    """h for `step` of `steps`: the schedule's value rounded up to a bucket (N when no horizon is set)."""
    n = dc.max_new_tokens
    start = _raw(dc.horizon, n)
    if dc.horizon_schedule == "linear" and steps > 1:
        start = start + (n - start) * step / (steps - 1)
    return next(b for b in buckets(n) if b >= min(math.ceil(start), n))


class ProgressiveHorizon:
    """The progressive schedule (POPD's rule, made exact): start at data.horizon's bucket; after each step
    record d_s, the token-mean teacher divergence of that step's batch (``on_policy/divergence``). The
    batch is the student's fresh samples of prompts it has not trained on, scored before the update
    uses them, so d_s is a held-out measurement of the current student at the current horizon. Once at
    least 2w steps ran at the current length, compare the means of the last w and the w before them:

        mean(d[-w:]) >= mean(d[-2w:-w])   (the divergence stopped falling)  ->  next bucket, history cleared

    The divergence is compared only within one length (a longer horizon adds later, harder tokens, so
    its level is not comparable). The full length is the last bucket.

    The schedule's state lives in the TrainState (`TrainState.horizon`, so a checkpoint resumes it): a
    float32 vector [1 + 2w], the bucket index then the last 2w divergences at that length (NaN where
    fewer were seen). This object holds only the settings; `initial`, `h` and `observe` are pure."""

    def __init__(self, dc):
        self.levels = buckets(dc.max_new_tokens)
        start = _raw(dc.horizon, dc.max_new_tokens)
        self.start = next(i for i, b in enumerate(self.levels) if b >= min(start, dc.max_new_tokens))
        self.window = dc.horizon_window

    def initial(self) -> np.ndarray:
        """The state at step 0: the starting bucket, no divergences."""
        return np.concatenate([[self.start], np.full(2 * self.window, np.nan)]).astype(np.float32)

    def h(self, state) -> int:
        """The horizon (new tokens) of `state`."""
        return self.levels[int(np.asarray(state)[0])]

    def observe(self, state, divergence: float) -> np.ndarray:
        """The state after one more step's divergence at the current length (the next bucket, history
        cleared, when the rule fires)."""
        state = np.asarray(state, np.float32)
        level, d = int(state[0]), np.append(state[2:], np.float32(divergence)).astype(np.float64)
        w = self.window
        if level + 1 < len(self.levels) and not np.isnan(d).any() and d[-w:].sum() >= d[:w].sum():
            return np.concatenate([[level + 1], np.full(2 * w, np.nan)]).astype(np.float32)
        return np.concatenate([[level], d]).astype(np.float32)


def initial_state(dc) -> np.ndarray:
    """TrainState.horizon at step 0: the progressive schedule's (`ProgressiveHorizon.initial`), else [0.]."""
    if dc.horizon_schedule == "progressive":
        return ProgressiveHorizon(dc).initial()
    return np.zeros(1, np.float32)


def truncate(roll, prompt_len: int, h: int):
    """A rollout (tokens [B, P+N], logprobs, mask [B, N]) cut to its first h completion tokens."""
    if roll.mask.shape[1] == h:
        return roll
    return roll._replace(tokens=roll.tokens[:, :prompt_len + h], logprobs=roll.logprobs[:, :h], mask=roll.mask[:, :h])


class UpdatePrograms:
    """The update, one compiled program per shape of the batch's parts: `full` (the fit check's, for
    `full_shapes`) and others compiled by `compile_for(shapes)` when a step first brings them: a shorter
    horizon (the on-policy rows' length), or packed rows (data.pack_tokens: the row count first fit
    needed that step). shapes: {part: its tokens' shape}. Called like an `UpdateProgram`."""

    def __init__(self, full, full_shapes: dict, compile_for):
        self.programs = {self.key(full_shapes): full}
        self.full, self.compile_for = full, compile_for

    @staticmethod
    def key(shapes: dict) -> tuple:
        return tuple(sorted((k, tuple(v)) for k, v in shapes.items()))

    def __getattr__(self, name):  # batch_sh, teacher_w_sh, memory(), flops(): the full program's
        return getattr(self.full, name)

    def __call__(self, state, batch, teacher_w=None):
        shapes = {k: p.tokens.shape for k, p in batch.items()}
        k = self.key(shapes)
        if k not in self.programs:
            self.programs[k] = self.compile_for(shapes)
        return self.programs[k](state, batch, teacher_w)
