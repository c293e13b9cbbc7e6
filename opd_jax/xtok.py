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

Byte-prefix marginalisation (arXiv 2607.22334): at a position where both tokenizations start a token,
the teacher's next-token distribution q over teacher tokens says how likely each byte string is to
come next; a teacher token u whose bytes begin with the student token s's bytes is an outcome in which
the student's next token could be s. Moving q(u) to the longest such s keeps all of q's mass on the
student's vocabulary plus one residual bucket (teacher tokens no student token prefixes). Not yet
wired into the trainer: docs/math.md will say what is exact and what is approximate once it is.
"""

from __future__ import annotations

import functools

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


def token_bytes(tok) -> list[bytes]:
    """[V] the bytes each id decodes to; b"" for special tokens (they are not text). Byte-level BPE
    pieces go through the byte table; other pieces are UTF-8, with sentencepiece's "▁" a space."""
    special = set(tok.all_special_ids)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    out = []
    dec = _byte_decoder() if _is_byte_level(tok) else None
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(b"")
        elif dec is not None:
            out.append(bytes(dec[c] for c in piece))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def spans(table: list[bytes], ids) -> np.ndarray:
    """[n, 2] byte [start, end) of each token in the concatenation of their bytes (`token_bytes` table)."""
    lengths = np.fromiter((len(table[int(i)]) for i in ids), np.int64, count=len(ids))
    ends = np.cumsum(lengths)
    return np.stack([ends - lengths, ends], 1)


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


def retokenize(tok, data: bytes):
    """The teacher tokenizer's ids for the bytes `data` (no special tokens), or None when they do not
    decode to exactly those bytes (invalid UTF-8 at a cut, or a normaliser that rewrites the text)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    ids = tok.encode(text, add_special_tokens=False)
    table = token_bytes(tok)
    return ids if b"".join(table[i] for i in ids) == data else None


def prefix_map(teacher: list[bytes], student: list[bytes]) -> np.ndarray:
    """[V_t] int64: for each teacher token, the id of the longest non-empty student token whose bytes are a
    prefix of its bytes; -1 when there is none (special tokens, or bytes no student token starts with)."""
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(student):
        if b and b not in by_bytes:
            by_bytes[b] = i
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
