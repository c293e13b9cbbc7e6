"""Packed rows: whole sequences (prompt + completion) laid end to end in rows of a fixed token budget,
so the update's and the teachers' forward and backward run on real tokens, not on padding.

A padded part holds n sequences as rows [n, P + N]: prompt left-padded to P, completion right-padded
to N. Packing takes each sequence's real tokens (its p_i prompt and c_i completion tokens, s_i = p_i +
c_i) and places them in rows of L tokens by first-fit decreasing: the longest sequence first, each into
the first row with room. A packed part has

    tokens    [R, L]  the sequences end to end, padding after the last one
    segments  [R, L]  1, 2, ... for the sequences of a row in order; 0 on padding
    positions [R, L]  0 .. s_i - 1 within each sequence (RoPE restarts; attention stays in the segment)

and, for the loss, every per-completion-token array [n, N] moves to [R, L - 1] at the position that
predicts it: completion token j of sequence i, at packed column start_i + p_i + j, is predicted by the
hidden state at column start_i + p_i + j - 1. The loss then reads a packed part as a padded one with
prompt length 1 (`Part.tokens[:, 1:]` are the targets), and `seq_index` [R, L - 1] names the sequence
of each target (n on non-targets) for per-sequence sums.

Everything here runs on the host, in numpy, before the arrays are placed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from opd_jax.errors import OpdError


def check_packing(cfg):
    """A one-line refusal for data.pack_tokens below the longest possible sequence."""
    dc = cfg.data
    longest = dc.max_prompt_len + dc.max_new_tokens
    if dc.pack_tokens and dc.pack_tokens < longest:
        raise OpdError(f"data.pack_tokens {dc.pack_tokens} is shorter than the longest sequence (max_prompt_len + "
                       f"max_new_tokens = {longest}); use at least {longest}, or 0 for padded rows")


def packed_rows(need: int, padded: int, blocks: int, unit: int, shards: int) -> int:
    """Rows per domain block of a packed part whose fullest block first-fits into `need` rows (`padded`: a
    block's padded rows): the fewest that are a multiple of `unit`, with blocks x rows also a multiple of
    `shards` (rows split evenly over the batch shards) while that is no more than the padded rows."""
    import math

    def fewest(step):
        return max(step, -(-need // step) * step)

    even = fewest(math.lcm(unit, shards // math.gcd(shards, blocks)))
    return even if even <= padded else fewest(unit)


def lognormal_lengths(median: float, p99: float, n: int, cap: int, rng) -> np.ndarray:
    """n completion lengths from a log-normal with this median and 99th percentile, cut to [1, cap]: the
    long-tailed mix of reasoning answers (`scripts/bench_packing.py`, `opd-jax plan --pack-lengths`)."""
    sigma = np.log(p99 / median) / 2.3263  # the 99th percentile of a standard normal
    return np.clip(np.round(np.exp(rng.normal(np.log(median), sigma, n))), 1, cap).astype(np.int64)


def expected_rows(cfg, rl, median: float, p99: float, unit: int, shards: int, seed: int = 0) -> dict:
    """The packed shapes {part: (rows, pack_tokens)} of a step whose completions follow a log-normal mix
    (`lognormal_lengths`, cut at max_new_tokens) and whose prompts are all max_prompt_len long (the most
    they can be): first fit per domain block, rounded as the trainer rounds (`packed_rows`)."""
    dc = cfg.data
    rng = np.random.RandomState(seed)
    blocks = len(rl.domains)
    out = {}
    for part in rl.parts:
        r = rl.rows(part) // blocks
        need = max(len(first_fit_decreasing(dc.max_prompt_len + lognormal_lengths(
            median, p99, r, dc.max_new_tokens, rng), dc.pack_tokens)) for _ in range(blocks))
        out[part] = (blocks * packed_rows(need, r, blocks, unit, shards), dc.pack_tokens)
    return out


def first_fit_decreasing(lengths, budget: int) -> list[list[int]]:
    """Bins (rows) of sequence indices, each summing to at most `budget` tokens: sequences in order of
    decreasing length (ties: lower index first), each into the first row it fits, else a new row.
    Within a row, sequences keep the order they were placed in. A sequence longer than the budget is a
    one-line error (it would need a row of its own longer than every other: raise data.pack_tokens)."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.max() > budget:
        i = int(lengths.argmax())
        raise OpdError(f"sequence {i} has {int(lengths[i])} tokens, more than the packing budget "
                       f"data.pack_tokens={budget}; raise data.pack_tokens to at least max_prompt_len + max_new_tokens")
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] == 0:
            continue
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= int(lengths[i])
                break
        else:
            rows.append([i])
            room.append(budget - int(lengths[i]))
    return rows


class Packing(NamedTuple):
    """Where each of n sequences went: row [n], start [n] (its first column), prompt [n] and completion
    [n] real lengths; rows R and budget L. Sequences without completion tokens are left out (row -1)."""
    row: np.ndarray
    start: np.ndarray
    prompt: np.ndarray
    completion: np.ndarray
    rows: int
    budget: int

    @property
    def real_tokens(self) -> int:
        placed = self.row >= 0
        return int(self.prompt[placed].sum() + self.completion[placed].sum())

    @property
    def real_token_fraction(self) -> float:
        """Real tokens / token slots the packed rows compute."""
        return self.real_tokens / max(1, self.rows * self.budget)


def plan_packing(prompt_mask, mask, budget: int, rows: int | None = None) -> Packing:
    """First-fit-decreasing placement of the sequences of a padded part: prompt_mask [n, P] (left
    padding), mask [n, N] (completion, right padding) -> Packing. rows: the static number of rows to
    fill (one-line error when the sequences need more); None: as many as first fit needs."""
    p = np.asarray(prompt_mask).sum(1).astype(np.int64)
    c = np.asarray(mask).sum(1).astype(np.int64)
    bins = first_fit_decreasing(np.where(c > 0, p + c, 0), budget)  # a sequence without completion: nothing to learn
    if rows is not None and len(bins) > rows:
        raise OpdError(f"the step's {int((p + c).sum())} tokens need {len(bins)} packed rows of {budget}, "
                       f"more than the {rows} compiled; raise data.pack_tokens")
    row, start = np.full(len(p), -1, np.int64), np.zeros(len(p), np.int64)
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            row[i], start[i] = r, at
            at += int(p[i] + c[i])
    return Packing(row, start, p, c, len(bins) if rows is None else rows, budget)


def pack_part(pk: Packing, tokens, prompt_mask, mask, pad_id: int = 0) -> dict:
    """The packed layout of a padded part's rows: tokens [n, P + N] (prompt left-padded to P, completion
    right-padded to N), prompt_mask [n, P], mask [n, N] -> {tokens, segments, positions [R, L]; mask
    [R, L - 1] (1 where the next token is a completion token); seq_index [R, L - 1] (the target's
    sequence, n elsewhere); where: (rows, cols) of every completion slot [n, N] in the [R, L - 1] target
    grid, -1 for padding slots}."""
    tokens, prompt_mask, mask = (np.asarray(x) for x in (tokens, prompt_mask, mask))
    n, P = prompt_mask.shape
    N = mask.shape[1]
    R, L = pk.rows, pk.budget
    out_tok = np.full((R, L), pad_id, tokens.dtype)
    seg = np.zeros((R, L), np.int32)
    pos = np.zeros((R, L), np.int32)
    tmask = np.zeros((R, L - 1), np.int32)
    seq_index = np.full((R, L - 1), n, np.int32)
    where_r = np.full((n, N), -1, np.int64)
    where_c = np.full((n, N), -1, np.int64)
    count = np.zeros(R, np.int32)
    for i in np.argsort(pk.start, kind="stable"):
        r = pk.row[i]
        if r < 0:
            continue
        count[r] += 1
        p, c, s = int(pk.prompt[i]), int(pk.completion[i]), int(pk.start[i])
        out_tok[r, s:s + p] = tokens[i, P - p:P]
        out_tok[r, s + p:s + p + c] = tokens[i, P:P + c]
        seg[r, s:s + p + c] = count[r]
        pos[r, s:s + p + c] = np.arange(p + c)
        cols = s + p + np.arange(c) - 1  # the hidden state that predicts completion token j
        if c and p == 0:
            raise OpdError(f"sequence {i} has no prompt token: its first completion token has nothing to be "
                           "predicted from")
        tmask[r, cols] = mask[i, :c]
        seq_index[r, cols] = i
        where_r[i, :c], where_c[i, :c] = r, cols
    return {"tokens": out_tok, "segments": seg, "positions": pos, "mask": tmask, "seq_index": seq_index,
            "where": (where_r, where_c)}


def scatter_tokens(where, x, grid: tuple[int, int], fill=0):
    """x [n, N, ...] (per completion token, host) -> [R, L - 1, ...] at `where` (pack_part's), fill elsewhere.
    Padding slots of x (where -1) are dropped."""
    x = np.asarray(x)
    r, c = where
    out = np.full(grid + x.shape[2:], fill, x.dtype)
    real = r >= 0
    out[r[real], c[real]] = x[real]
    return out


def gather_tokens(where, y, fill=0):
    """The inverse of `scatter_tokens`: y [R, L - 1, ...] -> [n, N, ...] (fill at padding slots).
    Works on numpy or jax arrays (a gather)."""
    import jax.numpy as jnp

    r, c = where
    real = r >= 0
    got = y[np.where(real, r, 0), np.where(real, c, 0)]
    mask = real.reshape(real.shape + (1,) * (got.ndim - 2))
    return jnp.where(mask, got, fill) if not isinstance(y, np.ndarray) else np.where(mask, got, fill)


def packed_part(part, budget: int, *, rows=None, blocks: int = 1, normalize: str = "token", pad_id: int = 0):
    """A padded `batch.Part` (host arrays; its teacher field is left out: teachers score the packed rows)
    -> (the packed Part, its real-token fraction, where). The part's rows are `blocks` equal blocks (its
    domains, each routed to one teacher), each packed on its own into `rows` rows (None: as many as the
    fullest block needs; a function: of that count, e.g. `packed_rows`' rounding), so the packed rows are `blocks` equal blocks too and every teacher's rows stay
    whole blocks. normalize="sequence": loss_mask holds 1 / (the target's sequence's completion tokens),
    so the token-normalised loss of the packed part is the padded part's sequence-normalised one.
    Per-token arrays (sampler log-probs) move to the target grid; seq_index counts sequences over the
    whole part (n elsewhere); rewards stay per sequence [n]. A part with a loss_mask (the positions a
    cross-tokenizer teacher covers) packs its mask as that coverage, and seq_tokens counts the covered
    positions, as the padded loss does."""
    from opd_jax.batch import Part

    n = part.tokens.shape[0]
    r = n // blocks
    cut = [slice(b * r, (b + 1) * r) for b in range(blocks)]
    plans = [plan_packing(part.prompt_mask[c], part.mask[c], budget) for c in cut]  # first fit, once a block
    need = max(pk.rows for pk in plans)
    rows = max(1, need) if rows is None else rows(need) if callable(rows) else rows
    if need > rows:
        raise OpdError(f"the step's sequences need {need} packed rows of {budget} in a block, more than the {rows} "
                       "compiled; raise data.pack_tokens")
    pieces, seq_tokens, real = [], [], 0
    where_r, where_c = np.full(part.mask.shape, -1, np.int64), np.full(part.mask.shape, -1, np.int64)
    for b, (c, pk) in enumerate(zip(cut, plans)):
        pk = pk._replace(rows=rows)
        d = pack_part(pk, part.tokens[c], part.prompt_mask[c], part.mask[c], pad_id)
        d["seq_index"] = np.where(d["seq_index"] < r, d["seq_index"] + b * r, n).astype(np.int32)
        wr, wc = d["where"]
        where_r[c], where_c[c] = np.where(wr >= 0, wr + b * rows, -1), wc
        seq_tokens.append(np.where(pk.row >= 0, pk.completion, 0))
        real += pk.real_tokens
        pieces.append(d)
    d = {k: np.concatenate([x[k] for x in pieces]) for k in ("tokens", "segments", "mask", "seq_index")}
    where = (where_r, where_c)
    grid = d["mask"].shape
    seq_tokens = np.concatenate(seq_tokens).astype(np.float32)
    if part.loss_mask is not None:  # a teacher covers only some positions: the packed mask is that coverage
        keep = np.asarray(part.loss_mask) * (where_r >= 0)
        d["mask"] = scatter_tokens(where, keep.astype(d["mask"].dtype), grid)
        seq_tokens = keep.sum(1).astype(np.float32)
    loss_mask = None
    if normalize == "sequence":
        per = np.append(seq_tokens, 1.0)[d["seq_index"]]
        loss_mask = np.where(d["mask"] > 0, 1.0 / np.maximum(per, 1.0), 0.0).astype(np.float32)
    slp = None if part.sampler_logprobs is None else scatter_tokens(where, part.sampler_logprobs, grid)
    rewards = None if part.rewards is None else np.asarray(part.rewards, np.float32)  # per sequence [n]
    out = Part(d["tokens"], np.ones((grid[0], 1), np.int32), d["mask"], None, slp, rewards, loss_mask,
               d["segments"], d["seq_index"], seq_tokens)
    return out, real / (grid[0] * budget), where
