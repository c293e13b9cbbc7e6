"""Teachers behind a server: the OpenAI-compatible completions endpoint with vLLM's `prompt_logprobs`.

Protocol (what vLLM and SGLang serve, and what TRL's asynchronous distillation uses):

    POST {url}/v1/completions
      {"model": M, "prompt": [[ids of row 0], [ids of row 1], ...], "max_tokens": 1,
       "prompt_logprobs": k, "temperature": T}
    -> {"choices": [{"index": i, "prompt_logprobs": [null, {"<token id>": {"logprob": x, "rank": r,
        "decoded_token": s}, ...}, ...]}, ...]}

Entry j of a row's `prompt_logprobs` is the distribution at position j given tokens 0..j-1: the k
most likely ids plus the prompt's own token j (so the sampled token's log-prob is always there).
The client sends only each row's real tokens (padding dropped) and reads back, at every completion
position, the sampled token's log-prob and the top k (ids and log-probs; the tail bucket
log(1 - sum top-k) follows from them). Payload per token: k + 1 (id, log-prob) pairs. `url` may be
the server's root (http://host:port) or its OpenAI base (http://host:port/v1).

`opd-jax serve-teacher --model DIR --port P` (`opd_jax.teacher_server`) serves a JAX teacher with this protocol (it also answers
GET /v1/models with the vocabulary size and POST /tokenize). Its log-probs are at the request's
temperature; vLLM's prompt log-probs are the raw model's (temperature 1), so a vLLM teacher needs
data.temperature 1.

Failures. `timeout` is one deadline for the whole scoring call: connecting, sending, every byte of
the reply, and the retries with their backoff (doubling from `backoff`, at most 8 s a wait). A
refused connection, an HTTP 5xx, a reply that misses the deadline or a reply that fails validation is
retried while the deadline allows; an HTTP 4xx or a redirect (never followed) is not. Then the run
stops with one line naming the teacher, the URL and what was wrong. Every reply is validated before
anything reaches the loss (`parse_scores`): finite log-probs <= 0 whose probabilities sum to <= 1,
ids inside the vocabulary and distinct, k entries and the sampled token at every position, one
choice per row in the order asked. SIGTERM (`preemption.STOP`) abandons a call within 0.1 s
(`preemption.StepAbandoned`); the trainer then keeps the last finished step.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np

from opd_jax.config import check_served, split_url
from opd_jax.errors import OpdError
from opd_jax.preemption import STOP, StepAbandoned

MAX_BACKOFF = 8.0  # seconds: the longest wait between two tries
LOGPROB_TOL = 1e-3  # a served log-prob may exceed 0, and a position's probabilities 1, by this much (rounding)
MAX_REPLY = 1 << 30  # bytes: a longer reply is refused


class _Retry(Exception):
    """A try failed in a way another try may not: message for the final error."""


class _Final(Exception):
    """A try failed in a way no retry can help (a 4xx, a redirect)."""


@dataclass
class ServedTeacher:
    """A teacher scored over HTTP. url: the server's base (http://host:port or http://host:port/v1);
    model: the name sent in requests; timeout (s): the deadline of one whole scoring call, retries
    included; retries after the first try; backoff: the first wait (doubles, at most MAX_BACKOFF)."""

    name: str
    url: str
    model: str = "teacher"
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 0.5
    vocab_size: int = 0  # the student's vocabulary, set by `check` (0: ids are only checked to be >= 0)
    payload_bytes: int = 0  # response bytes received so far
    payload_tokens: int = 0  # completion tokens they scored
    live = False  # the teachers.Teacher protocol: never the student's current weights
    packs = False  # ... and it scores the padded rows (packed runs move its scores: `Rollouts._scatter`)

    def __post_init__(self):
        check_served(self.url, self.timeout, self.retries, f"teacher {self.name!r}")
        self.scheme, self.host, self.port, self.base = split_url(self.url, f"teacher {self.name!r}: url")

    def _where(self, path: str) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.base}{path}"

    def _once(self, path: str, data: bytes | None, deadline: float) -> bytes:
        """One HTTP exchange that ends by `deadline` (time.monotonic) or on SIGTERM: a watchdog thread
        shuts the socket, so a server that trickles its reply cannot hold the call. -> the 200 body."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Retry(f"no complete reply within the {self.timeout:g} s deadline")
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=remaining)
        done, why, sock = threading.Event(), [], []

        def watch():
            while not done.wait(0.05):
                if STOP.is_set() or time.monotonic() > deadline:
                    why.append("stop" if STOP.is_set() else "deadline")
                    try:  # the socket as connected: http.client drops conn.sock while a reply is still read
                        if sock:
                            sock[0].shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return

        threading.Thread(target=watch, name="opd-served-watchdog", daemon=True).start()
        try:
            conn.connect()
            sock.append(conn.sock)
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            conn.request("GET" if data is None else "POST", self.base + path, body=data, headers=headers)
            resp = conn.getresponse()
            if (resp.length or 0) > MAX_REPLY:
                raise _Final(f"the reply's Content-Length {resp.length} is over {MAX_REPLY} bytes")
            raw = resp.read()  # IncompleteRead when the socket is shut before Content-Length bytes
            status, reason = resp.status, resp.reason
            if why:  # shut down just as the last byte arrived
                raise OSError("interrupted")
        except (OSError, http.client.HTTPException, ValueError) as e:
            if why:
                if why[0] == "stop":
                    raise StepAbandoned(f"SIGTERM during a call to teacher {self.name!r}") from None
                raise _Retry(f"no complete reply within the {self.timeout:g} s deadline") from None
            raise _Retry(str(getattr(e, "reason", None) or e) or type(e).__name__) from None
        finally:
            done.set()
            conn.close()
        if 300 <= status < 400:
            raise _Final(f"HTTP {status} {reason}: redirects are not followed (give the server's own address)")
        if status != 200:
            detail = ""
            try:
                detail = str(json.loads(raw).get("error", ""))[:200]
            except (ValueError, AttributeError):
                pass
            msg = f"HTTP {status} {reason}" + (f" ({detail})" if detail else "")
            raise (_Final if 400 <= status < 500 and status not in (408, 429) else _Retry)(msg)
        return raw

    def _call(self, path: str, body: dict | None = None, parse=lambda reply: reply):
        """POST `body` (GET without one) to `path`, validate with parse(reply dict) (a ValueError there is
        a bad reply: retried), retry within the deadline -> parse's result."""
        data = None if body is None else json.dumps(body).encode()
        start = time.monotonic()
        deadline = start + self.timeout
        last, tries = "no reply", 0
        for attempt in range(self.retries + 1):
            if attempt:
                wait = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF)
                if time.monotonic() + wait >= deadline:
                    break
                if STOP.wait(wait):
                    raise StepAbandoned(f"SIGTERM while retrying teacher {self.name!r}")
            tries += 1
            try:
                raw = self._once(path, data, deadline)
                try:
                    reply = json.loads(raw)
                except ValueError as e:
                    raise _Retry(f"malformed reply (not JSON: {e})") from None
                if not isinstance(reply, dict):
                    raise _Retry("malformed reply (not a JSON object)")
                try:
                    out = parse(reply)
                except (ValueError, TypeError, KeyError, AttributeError) as e:
                    raise _Retry(f"malformed reply ({e})") from None
                self.payload_bytes += len(raw) if body is not None else 0
                return out
            except _Retry as e:
                last = str(e)
            except _Final as e:
                last = str(e)
                break
        raise OpdError(f"teacher {self.name!r} at {self._where(path)} failed after {tries} "
                       f"{'try' if tries == 1 else 'tries'}: {last}")

    def check(self, vocab_size: int, tokenizer=None):
        """Refuse, before the first step, a server whose vocabulary differs from the student's (its
        reported vocab_size, else its /tokenize of a probe text against the student tokenizer's)."""
        self.vocab_size = vocab_size

        def served_vocab(reply):
            models = reply.get("data")
            if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
                raise ValueError("/v1/models has no list of models under 'data'")
            mine = [m for m in models if m.get("id") == self.model] or models
            v = mine[0].get("vocab_size")
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"vocab_size {v!r} is not a whole number >= 1")
            return v

        served = self._call("/v1/models", parse=served_vocab)
        if served is not None:
            if served != vocab_size:
                raise OpdError(f"teacher {self.name!r} at {self.url} has vocabulary {served} but the student has "
                               f"{vocab_size}; they must share a tokenizer")
            return
        if tokenizer is None:
            raise OpdError(f"teacher {self.name!r} at {self.url} reports no vocab_size and no tokenizer was given "
                           "to compare with")
        probe = "The teacher and the student must share 1 tokenizer: 2 + 2 = 4."

        def tokens(reply):
            ids = reply.get("tokens")
            if not isinstance(ids, list):
                raise ValueError("/tokenize gave no 'tokens' list")
            return ids

        theirs = self._call("/tokenize", {"model": self.model, "prompt": probe, "add_special_tokens": False}, tokens)
        ours = tokenizer(probe, add_special_tokens=False)["input_ids"]
        if list(theirs) != list(ours):
            raise OpdError(f"teacher {self.name!r} at {self.url} tokenizes differently from the student; they "
                           "must share a tokenizer")

    def score(self, rows, what: str, *, temperature: float, topk: int = 0):
        """The `teachers.Teacher` protocol: `score_ids` of the rows' tokens, brought to the host."""
        from opd_jax.distributed import to_host
        from opd_jax.batch import Scored

        return Scored(self.score_ids(to_host(rows.tokens), to_host(rows.full_mask), prompt_len=rows.prompt_len,
                                     temperature=temperature, what=what, topk=topk))

    def output_matrix(self):
        return None  # it hands over scores, not hidden states

    def metrics(self) -> dict:
        """What crossed the wire per scored token."""
        return {f"teacher/{self.name}/payload_bytes_per_token": self.bytes_per_token}

    def score_ids(self, tokens, full_mask, *, prompt_len: int, temperature: float, what: str, topk: int = 0):
        """tokens, full_mask [B, P+N] (host) -> what="logprobs": [B, N] float32 log q(y_t); "topk":
        (log-probs [B, N, k] float32, ids [B, N, k] int32); zeros past each row's end. Nothing is
        returned from a reply that fails `parse_scores`."""
        if what not in ("logprobs", "topk"):
            raise OpdError(f"a served teacher hands over log-probs or top-k, not {what}; use loss.estimator_type "
                           "sampled or topk")
        tokens, full_mask = np.asarray(tokens), np.asarray(full_mask)
        rows, firsts = [], []
        for i in range(tokens.shape[0]):
            keep = full_mask[i] > 0
            rows.append([int(t) for t in tokens[i][keep]])
            firsts.append(int(keep[:prompt_len].sum()))  # index of the first completion token in the row
        k = max(topk, 1) if what == "topk" else 1  # log-probs only: the sampled token comes with any k
        n = tokens.shape[1] - prompt_len
        lens = (full_mask[:, prompt_len:] > 0).sum(1)
        lp, top_lp, top_id = self._call(
            "/v1/completions", {"model": self.model, "prompt": rows, "max_tokens": 1, "prompt_logprobs": k,
                                "temperature": temperature},
            lambda reply: parse_scores(reply, rows, firsts, lens, n, k, self.vocab_size))
        self.payload_tokens += int(lens.sum())
        return lp if what == "logprobs" else (top_lp, top_id)

    @property
    def bytes_per_token(self) -> float:
        return self.payload_bytes / max(self.payload_tokens, 1)


def _number(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{where}: log-prob {x!r} is not a number")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{where}: log-prob {x} is not finite")
    if x > LOGPROB_TOL:
        raise ValueError(f"{where}: log-prob {x} is above 0")
    return x


def parse_scores(reply: dict, rows, firsts, lens, n: int, k: int, vocab: int = 0):
    """A /v1/completions reply -> (sampled-token log-probs [B, N], top-k log-probs [B, N, k], top-k ids
    [B, N, k]) at the completion positions (row i's position j is entry firsts[i] + j of its
    prompt_logprobs, for j < lens[i]; zeros past the end). Raises ValueError naming the row, the
    position and what is wrong: choices not one per row in the order asked (`index` 0..B-1), an entry
    count that is not the row's length, an id that is not a whole number in [0, vocab) or repeats, a
    log-prob not finite or above 0, probabilities summing past 1, fewer than k ids, the sampled token
    missing."""
    b = len(rows)
    choices = reply.get("choices")
    if not isinstance(choices, list) or len(choices) != b or not all(isinstance(c, dict) for c in choices):
        got = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise ValueError(f"'choices' must be a list of {b} objects (one per row), got {got}")
    index = [c.get("index", i) for i, c in enumerate(choices)]
    if any(isinstance(x, bool) or not isinstance(x, int) for x in index) or sorted(index) != list(range(b)):
        raise ValueError(f"the choices' indices are {index}, not each of 0..{b - 1} once")
    choices = [choices[index.index(i)] for i in range(b)]
    lp = np.zeros((b, n), np.float32)
    top_lp, top_id = np.zeros((b, n, k), np.float32), np.zeros((b, n, k), np.int32)
    for i, c in enumerate(choices):
        entries = c.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(rows[i]):
            have = len(entries) if isinstance(entries, list) else "none"
            raise ValueError(f"row {i} has {len(rows[i])} tokens but its prompt_logprobs has {have}")
        for j in range(int(lens[i])):
            e = firsts[i] + j
            where, tok = f"row {i}, position {e}", rows[i][e]
            entry = entries[e]
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: the entry is {type(entry).__name__}, not an object of ids")
            scored = {}
            for key, v in entry.items():
                try:
                    t = int(key)
                except ValueError:
                    raise ValueError(f"{where}: id {key!r} is not a whole number") from None
                if t < 0 or (vocab and t >= vocab):
                    raise ValueError(f"{where}: id {t} is outside the vocabulary [0, {vocab or 'V'})")
                if t in scored:
                    raise ValueError(f"{where}: id {t} appears twice")
                if not isinstance(v, dict):
                    raise ValueError(f"{where}: id {t} has no log-prob object")
                scored[t] = _number(v.get("logprob"), f"{where}, id {t}")
            if tok not in scored:
                raise ValueError(f"{where}: the sampled token {tok} is missing")
            if len(scored) < k:
                raise ValueError(f"{where}: {len(scored)} ids where the top {k} were asked for")
            mass = sum(math.exp(x) for x in scored.values())
            if mass > 1 + LOGPROB_TOL:
                raise ValueError(f"{where}: the probabilities sum to {mass:.4f} > 1")
            ranked = sorted(((x, t) for t, x in scored.items()), reverse=True)[:k]
            lp[i, j] = scored[tok]
            top_lp[i, j], top_id[i, j] = [x for x, _ in ranked], [t for _, t in ranked]
    return lp, top_lp, top_id
