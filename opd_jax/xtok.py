"""Cross-tokenizer building blocks (issue 26, in progress): the bytes of every token, the byte spans of a
tokenized text, where two tokenizations share a boundary, and the byte-prefix map from a teacher's
vocabulary onto a student's.

    token_bytes(tok)        [V] the UTF-8 bytes each id stands for (b"" for special tokens)
    spans(tok, ids)         [n, 2] byte [start, end) of each token of `ids` in their decoded bytes
    shared_boundaries(a, b) byte offsets where both span lists end a token (sorted, both cover the text)
    prefix_map(t_bytes, s_bytes)
                            [V_t] for each teacher token, the longest student token whose bytes are a
                            prefix of its bytes (-1: none, the residual bucket)
    matching_starts(s, t)   [n_s] for each student token, the teacher token starting at the same byte
                            (-1: none there), the positions where the teacher's next-token distribution
                            is exactly comparable with the student's
    retokenize(t_tok, data) the teacher's ids for bytes `data`, or None when its tokenizer does not give
                            the same bytes back (normalisation): such rows are counted and masked
    project(q, pmap, v_s)   [..., V_s + 1] teacher probabilities moved onto the student vocabulary by
                            `pmap` (a segment sum), the last column the residual; rows still sum to 1
    vocab_map(t, s, how)    [V_t] the map the loss applies: bpm (byte prefix) or uld (identical bytes), special
                            tokens by their text and the teacher's EOS onto the student's stop id
    align_rows(...)         the teacher's view of a batch of student completions (`Aligned`): its token ids,
                            which teacher position predicts each student token, and the segment sums

Byte-prefix marginalisation (arXiv 2607.22334): at a position where both tokenizations start a token,
the teacher's next-token distribution q over teacher tokens says how likely each byte string is to
come next; a teacher token u whose bytes begin with the student token s's bytes is an outcome in which
the student's next token could be s. Moving q(u) to the longest such s keeps all of q's mass on the
student's vocabulary plus one residual bucket (teacher tokens no student token prefixes). The loss
that applies the map chunk by chunk is `opd_jax.losses.xtok`; docs/math.md §9 says what is exact and
what is an approximation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable-character table, which byte-level BPE vocabularies use."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _is_byte_level(tok) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def _byte_fallback(tok) -> bool:
    """SentencePiece-style byte fallback (Llama 2, Mistral, Gemma): characters outside the vocabulary are
    written as tokens <0x00> .. <0xFF>, one per UTF-8 byte."""
    model = getattr(getattr(tok, "backend_tokenizer", None), "model", None)
    return bool(getattr(model, "byte_fallback", False))


def token_bytes(tok) -> list[bytes]:
    """[V] the bytes each id decodes to; b"" for special tokens (they are not text). Byte-level BPE
    pieces go through the byte table; other pieces are UTF-8, with sentencepiece's "▁" a space, and a
    byte-fallback tokenizer's <0xNN> the single byte NN."""
    special = set(tok.all_special_ids)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    out = []
    dec = _byte_decoder() if _is_byte_level(tok) else None
    fallback = dec is None and _byte_fallback(tok)
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(b"")
        elif dec is not None:
            out.append(bytes(dec[c] for c in piece))
        elif fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def spans(table: list[bytes], ids) -> np.ndarray:
    """[n, 2] byte [start, end) of each token in the concatenation of their bytes (`token_bytes` table;
    an id outside it has no bytes)."""
    return spans_from_lengths(np.fromiter(map(len, table), np.int64, count=len(table)), ids)


def spans_from_lengths(lengths: np.ndarray, ids) -> np.ndarray:
    """`spans` from the tokens' byte lengths [V] (computed once per table by a caller aligning many rows)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    ok = (ids >= 0) & (ids < len(lengths))
    ln = np.where(ok, lengths[np.where(ok, ids, 0)], 0)
    ends = np.cumsum(ln)
    return np.stack([ends - ln, ends], 1)


def shared_boundaries(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Byte offsets where a token ends in both span lists (each [n, 2] from `spans` over the same bytes):
    the positions where the two tokenizations agree exactly. Empty tokens add no boundary."""
    return np.intersect1d(a[:, 1][a[:, 1] > a[:, 0]], b[:, 1][b[:, 1] > b[:, 0]])


def matching_starts(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """[n_s] int64: for each non-empty student token (spans [n_s, 2]), the index of the non-empty teacher
    token (spans [n_t, 2]) that starts at the same byte offset, else -1. Both span lists must cover the
    same bytes. Monotone: matched teacher indices increase with the student index."""
    t_keep = np.flatnonzero(teacher[:, 1] > teacher[:, 0])
    t_starts = teacher[t_keep, 0]
    k = np.searchsorted(t_starts, student[:, 0])
    hit = (k < len(t_starts)) & (student[:, 1] > student[:, 0])
    hit[hit] &= t_starts[k[hit]] == student[hit, 0]
    out = np.full(len(student), -1, np.int64)
    out[hit] = t_keep[k[hit]]
    return out


def retokenize(tok, data: bytes, table: list[bytes] | None = None):
    """The teacher tokenizer's ids for the bytes `data` (no special tokens), or None when they do not
    decode to exactly those bytes (invalid UTF-8 at a cut, or a normaliser that rewrites the text).
    table: `token_bytes(tok)`, when the caller has it (building it reads the whole vocabulary)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    ids = tok.encode(text, add_special_tokens=False)
    table = token_bytes(tok) if table is None else table
    return ids if b"".join(table[i] for i in ids) == data else None


def _first_id_of(table: list[bytes]) -> dict[bytes, int]:
    """bytes -> the first id of `table` with exactly those (non-empty) bytes."""
    out: dict[bytes, int] = {}
    for i, b in enumerate(table):
        if b:
            out.setdefault(b, i)
    return out


def prefix_map(teacher: list[bytes], student: list[bytes]) -> np.ndarray:
    """[V_t] int64: for each teacher token, the id of the longest non-empty student token whose bytes are a
    prefix of its bytes; -1 when there is none (special tokens, or bytes no student token starts with)."""
    by_bytes = _first_id_of(student)
    longest = max((len(b) for b in by_bytes), default=0)
    out = np.full(len(teacher), -1, np.int64)
    for i, b in enumerate(teacher):
        for n in range(min(len(b), longest), 0, -1):
            hit = by_bytes.get(b[:n])
            if hit is not None:
                out[i] = hit
                break
    return out


def project(q: np.ndarray, pmap: np.ndarray, v_student: int) -> np.ndarray:
    """Teacher probabilities q [..., V_t] moved onto the student's vocabulary: column s sums q over the
    teacher tokens mapped to s, the last column (index v_student) the residual (pmap -1). -> [..., V_s + 1]."""
    idx = np.where(pmap < 0, v_student, pmap)
    flat = q.reshape(-1, q.shape[-1])
    out = np.zeros((flat.shape[0], v_student + 1), q.dtype)
    np.add.at(out.T, idx, flat.T)  # a segment sum over the teacher axis
    return out.reshape(q.shape[:-1] + (v_student + 1,))


def special_pairs(teacher_tok, student_tok, student_stop: tuple = ()) -> dict[int, int]:
    """teacher special id -> student id: a special token with the same text on both sides, and the
    teacher's EOS onto the student's first stop id (the two models' "stop here" outcome)."""
    s_special = {student_tok.convert_ids_to_tokens(i): i for i in student_tok.all_special_ids}
    out = {}
    for i in teacher_tok.all_special_ids:
        hit = s_special.get(teacher_tok.convert_ids_to_tokens(i))
        if hit is not None:
            out[i] = hit
    stop = student_stop[0] if student_stop else student_tok.eos_token_id
    if teacher_tok.eos_token_id is not None and stop is not None:
        out.setdefault(teacher_tok.eos_token_id, stop)
    return out


def vocab_map(teacher_tok, student_tok, how: str, *, teacher_vocab: int, student_stop: tuple = ()) -> np.ndarray:
    """[teacher_vocab] int32: where the loss moves each teacher token's probability on the student's
    vocabulary (-1: nowhere, the residual). how="bpm": the longest student token that is a byte prefix
    of it (`prefix_map`); how="uld": the student token with exactly its bytes (ULD's matched set).
    Special tokens go by `special_pairs`; ids past the tokenizer (a padded embedding) to -1."""
    t_bytes, s_bytes = token_bytes(teacher_tok), token_bytes(student_tok)
    if how == "bpm":
        m = prefix_map(t_bytes, s_bytes)
    elif how == "uld":
        by_bytes = _first_id_of(s_bytes)
        m = np.array([by_bytes.get(b, -1) if b else -1 for b in t_bytes], np.int64)
    else:
        raise ValueError(f"unknown cross-tokenizer map {how!r}")
    for t, s in special_pairs(teacher_tok, student_tok, student_stop).items():
        m[t] = s
    out = np.full(teacher_vocab, -1, np.int32)
    n = min(teacher_vocab, len(m))
    out[:n] = m[:n]
    return out


@dataclass
class Aligned:
    """The teacher's view of n student completions of N tokens (teacher completion length M).

    tokens / mask [n, M]: the completion re-tokenized by the teacher (its EOS appended where the student
    stopped), right-padded. gather [n, N]: the teacher completion index whose hidden state predicts
    student token i (its token starts at the same byte; 0 where none). aligned [n, N]: 1 there (the
    full / top-k loss mask). segment [n, M]: the student token that receives a teacher token's
    log-prob (the last student token before the next shared boundary; N: none). whole [n, N]: 1 on a
    student token whose segment the teacher scored entirely (the sampled loss mask). dropped: rows the
    teacher cannot re-tokenize to the same bytes (normalisation: masked); truncated: rows cut at M teacher
    tokens; partial: rows aligned only up to a token without text (a special token) or bytes that are not
    UTF-8 (the rest masked)."""

    tokens: np.ndarray
    mask: np.ndarray
    gather: np.ndarray
    aligned: np.ndarray
    segment: np.ndarray
    whole: np.ndarray
    dropped: int = 0
    truncated: int = 0
    partial: int = 0


def align_rows(comp, comp_mask, student_table, student_stop, teacher_tok, teacher_table, m_len: int,
               pad_id: int = 0) -> Aligned:
    """Re-tokenize each student completion comp [n, N] (mask [n, N]) for the teacher and align them by
    byte offsets (see `Aligned`). A row ends with the student's stop id: the teacher's EOS follows its
    bytes and the two stop positions are aligned (they start at the same byte, the end)."""
    comp, comp_mask = np.asarray(comp), np.asarray(comp_mask)
    n, big_n = comp.shape
    out = Aligned(np.full((n, m_len), pad_id, np.int32), np.zeros((n, m_len), np.int32),
                  np.zeros((n, big_n), np.int32), np.zeros((n, big_n), np.int32),
                  np.full((n, m_len), big_n, np.int32), np.zeros((n, big_n), np.int32))
    t_eos = teacher_tok.eos_token_id
    stops = set(int(s) for s in student_stop)
    s_len = np.fromiter(map(len, student_table), np.int64, count=len(student_table))
    t_len = np.fromiter(map(len, teacher_table), np.int64, count=len(teacher_table))

    rows = []  # pass 1: what each row shows the teacher
    for r in range(n):
        ids = [i if i < len(student_table) else -1 for i in comp[r, comp_mask[r] > 0].tolist()]
        stopped = bool(ids) and ids[-1] in stops
        body = ids[:-1] if stopped else ids  # -1: an id past the tokenizer (a padded embedding): no bytes
        # the teacher sees the text up to the first token without bytes (a special token, an id past the
        # tokenizer: the teacher cannot see it, so later contexts would differ) or the first byte that is
        # not UTF-8; student tokens past that point are not aligned
        empty = [k for k, i in enumerate(body) if i < 0 or not s_len[i]]
        text_ids = body[:empty[0]] if empty else body
        data = b"".join(student_table[i] for i in text_ids)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            data = data[:e.start]
            text = data.decode("utf-8")
        cut = len(text_ids) < len(body) or len(data) < int(s_len[text_ids].sum() if text_ids else 0)
        out.partial += cut
        rows.append((body, stopped and not cut, data, text))
    # one batched call of the teacher's tokenizer for every row's text
    encoded = teacher_tok([x[3] for x in rows], add_special_tokens=False)["input_ids"] if rows else []
    for r, ((body, stopped, data, _), t_ids) in enumerate(zip(rows, encoded)):
        if b"".join(teacher_table[i] for i in t_ids) != data:  # a normaliser rewrote the text
            out.dropped += 1
            continue
        s_sp, t_sp = spans_from_lengths(s_len, body), spans_from_lengths(t_len, t_ids)
        eos_pair = stopped and t_eos is not None
        full = t_ids + [t_eos] if eos_pair else list(t_ids)
        keep = min(len(full), m_len)
        out.truncated += keep < len(full)
        out.tokens[r, :keep], out.mask[r, :keep] = full[:keep], 1
        # teacher tokens kept for the body (the EOS, if kept, is handled below)
        kb = min(len(t_ids), keep)
        starts = matching_starts(s_sp, t_sp[:kb])
        hit = starts >= 0
        out.gather[r, :len(body)] = np.where(hit, starts, 0)
        out.aligned[r, :len(body)] = hit
        # segments: each kept teacher token's log-prob goes to the last student token of its segment
        bounds = shared_boundaries(s_sp, t_sp)
        s_ends = s_sp[:, 1]
        if kb and len(bounds):
            k = np.searchsorted(bounds, t_sp[:kb, 1])  # the first shared boundary at or after each token's end
            ok = k < len(bounds)  # none: the token runs past the last shared boundary, its log-prob is dropped
            seg_end = bounds[np.minimum(k, len(bounds) - 1)]
            out.segment[r, :kb] = np.where(ok, np.searchsorted(s_ends, seg_end), big_n)
            covered = t_sp[kb - 1, 1]  # bytes the kept teacher tokens score
            ks = np.searchsorted(bounds, s_ends)
            s_seg_end = bounds[np.minimum(ks, len(bounds) - 1)]
            out.whole[r, :len(body)] = (ks < len(bounds)) & (s_seg_end <= covered) & (s_ends > s_sp[:, 0])
        if eos_pair and keep == len(full):
            i_s, i_t = len(body), len(t_ids)
            out.gather[r, i_s], out.aligned[r, i_s] = i_t, 1
            out.segment[r, i_t], out.whole[r, i_s] = i_s, 1
    return out
