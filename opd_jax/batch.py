"""The batch a step trains on: `Batch` (what the rollouts hand the loop) holding `Part`s (what the update takes),
and `Rows` / `Scored`: the view of a batch a teacher scores, and what it hands back (`teachers.Teacher`).

A step's batch has up to two parts: "on", the student's own samples, and "off", dataset answers (GKD,
loss.lam < 1); the loss is lam * L(on) + (1 - lam) * L(off). Rows are grouped by domain
(`opd_jax.layout.RowLayout`), so each teacher's rows are fixed blocks. A part's arrays:

    tokens            [B, P+N] int32   prompt (left-padded to P) then completion
    prompt_mask       [B, P]   int32   1 on real prompt tokens
    mask              [B, N]   int32   1 on generated tokens, EOS included
    teacher                            the teachers' hand-over at the completion positions:
                                         hidden-state estimators: {name: [rows routed to it, N, D_t]}
                                         (the update applies each teacher's output matrix beside the batch,
                                         chunk by chunk: no [B, N, V] array exists);
                                         sampled / rl: log q(y_t) [B, N]; served top-k: (log-probs, ids) [B, N, k]
    sampler_logprobs  [B, N]   float32 on-policy: log pi_sampler(y_t) (None off-policy)
    rewards           [B]      float32 on-policy: verifier rewards (None off-policy)
    loss_mask         [B, N]   int32   cross-tokenizer runs: the positions the teachers' hand-over covers
                                       (the loss is masked by it); None otherwise

A packed part (`opd_jax.packing`, data.pack_tokens) holds the same sequences end to end in R rows of L
tokens: tokens [R, L], prompt_mask [R, 1] (unused), and every per-token array at the position that
predicts it, [R, L - 1] (the targets are tokens[:, 1:]), plus

    segments          [R, L]      int32   each token's sequence in its row (0: padding); positions restart
                                          at each segment (`transformer.segment_positions`)
    seq_index         [R, L - 1]  int32   the sequence (0 .. n - 1) each target belongs to; n elsewhere
    seq_tokens        [n]         float32 each sequence's completion tokens (per-sequence sums divide by it)
    rewards           [n]         float32 on-policy: per sequence, as padded (RL advantages gather them by
                                          seq_index)

With normalize="sequence", loss_mask holds 1 / seq_tokens on each target (so a token-normalised sum is
the mean over sequences of each sequence's mean).

What kind of hand-over the teacher field holds is decided once, in the update's `StepSpec` (its
`handover` and `cross`), not read back from shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np


class Part(NamedTuple):
    """One part of a step's batch (the module docstring gives shapes); a pytree whose None fields are absent."""

    tokens: object
    prompt_mask: object
    mask: object
    teacher: object = None
    sampler_logprobs: object = None
    rewards: object = None
    loss_mask: object = None
    segments: object = None
    seq_index: object = None
    seq_tokens: object = None

    def rows(self, take) -> "Part":
        """This part with take(x) applied to every row array except the teachers' hand-over (and a packed
        part's per-sequence arrays)."""
        return self._replace(**{f: take(getattr(self, f)) for f in self._fields
                                if f not in ("teacher",) + self.per_sequence and getattr(self, f) is not None})

    @property
    def per_sequence(self) -> tuple:
        """The fields indexed by sequence [n], not by row: a packed part's seq_tokens and rewards."""
        return ("seq_tokens", "rewards") if self.packed else ()

    @property
    def packed(self) -> bool:
        return self.segments is not None

    @property
    def scored_mask(self):
        """The positions the loss counts: loss_mask where the teachers cover only some, else mask."""
        return self.mask if self.loss_mask is None else self.loss_mask


@dataclass
class Batch:
    """A step's data. arrays: {"on": Part, "off": Part} for the update; examples: the on-policy rows'
    prompts (repeated per sample); texts / rewards: their decoded completions and verifier rewards (None
    when nothing read them this step); engine: the rollout engine's statistics."""

    arrays: dict
    examples: list = field(default_factory=list)
    texts: list | None = None
    rewards: np.ndarray | None = None
    engine: object = None  # the on-policy rollout's engine.EngineStats (occupancy, decode steps)
    metrics: dict = field(default_factory=dict)  # staleness, drops, cross-tokenizer statistics; asynchronous waits
    versions: np.ndarray | None = None  # the policy version of every sampled token [B, N]
    timeline: list | None = None  # asynchronous runs: (event, batch / version, time) of the pipeline so far


class Rows(NamedTuple):
    """One teacher's rows of a batch as the student sampled them: tokens, full_mask [n, P+N] (P =
    prompt_len; packed rows: tokens and segment ids [R, L], the targets tokens[:, 1:]), the rows' examples (privileged and cross-tokenizer teachers build their own prompts from
    them), params: the student's current parameters (self_live teachers score with them), place: host
    [n, ...] -> an array with rows on the batch axes (None: jnp.asarray)."""

    tokens: object
    full_mask: object
    prompt_len: int
    examples: list | None = None
    params: object = None
    place: Callable | None = None
    packed: bool = False  # packed rows (`opd_jax.packing`): full_mask holds their segment ids, prompt_len is 1

    def take(self, idx) -> "Rows":
        """Rows `idx` (batch row indices) of these rows."""
        if list(idx) == list(range(self.tokens.shape[0])):
            return self
        i = np.asarray(idx)
        ex = None if self.examples is None else [self.examples[j] for j in idx]
        return self._replace(tokens=self.tokens[i], full_mask=self.full_mask[i], examples=ex)

    def put(self, x):
        import jax.numpy as jnp

        return jnp.asarray(x) if self.place is None else self.place(x)

    def completions(self):
        """(completion ids [n, N], mask [n, N]) on the host."""
        from opd_jax.distributed import to_host
        return to_host(self.tokens)[:, self.prompt_len:], to_host(self.full_mask)[:, self.prompt_len:]


class Scored(NamedTuple):
    """A teacher's hand-over for its rows (`score`'s `what`), keep [n, N] (host 0/1, or None for all): the
    completion positions the hand-over covers (a cross-tokenizer teacher's aligned positions); stats:
    numbers to add up over teachers (cross-tokenizer alignment)."""

    out: object
    keep: np.ndarray | None = None
    stats: dict = {}
