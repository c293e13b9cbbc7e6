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
log(1 - sum top-k) follows from them). Payload per token: k + 1 (id, log-prob) pairs.

`opd-jax serve-teacher --model DIR --port P` serves a JAX teacher with this protocol (it also answers
GET /v1/models with the vocabulary size and POST /tokenize). Its log-probs are at the request's
temperature; vLLM's prompt log-probs are the raw model's (temperature 1), so a vLLM teacher needs
data.temperature 1.

Failures: a refused connection, a timeout, an HTTP error or a malformed reply is retried with
exponential backoff (`retries` times); then the run stops with one line naming the URL. A step is
only trained on when every row's scores arrived.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from opd_jax.errors import OpdError


# ----------------------------------------------------------------------------- client


@dataclass
class ServedTeacher:
    """A teacher scored over HTTP. url: the server's base (http://host:port); model: the name sent in
    requests; timeout (s) per request; retries after the first try; backoff: the first wait (doubles)."""

    name: str
    url: str
    model: str = "teacher"
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 0.5
    payload_bytes: int = 0  # response bytes received so far
    payload_tokens: int = 0  # completion tokens they scored
    privileged: str = ""  # OPSD: as teachers.Teacher (the server scores whatever prompt it is sent)
    template: str = ""

    def _call(self, path: str, body: dict | None = None) -> dict:
        url = self.url.rstrip("/") + path
        data = None if body is None else json.dumps(body).encode()
        last = "no reply"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
                reply = json.loads(raw)
                if not isinstance(reply, dict):
                    raise ValueError("the reply is not a JSON object")
                self.payload_bytes += len(raw) if body is not None else 0
                return reply
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code in (400, 404, 422):  # the request itself is wrong: retrying cannot help
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = str(getattr(e, "reason", e))
            except ValueError as e:
                last = f"malformed reply ({e})"
        raise OpdError(f"teacher {self.name!r} at {url} failed after {attempt + 1} tries: {last}")

    def check(self, vocab_size: int, tokenizer=None):
        """Refuse, before the first step, a server whose vocabulary differs from the student's (its
        reported vocab_size, else its /tokenize of a probe text against the student tokenizer's)."""
        models = self._call("/v1/models").get("data") or [{}]
        served = models[0].get("vocab_size")
        if served is not None:
            if int(served) != vocab_size:
                raise OpdError(f"teacher {self.name!r} at {self.url} has vocabulary {served} but the student has "
                               f"{vocab_size}; they must share a tokenizer")
            return
        if tokenizer is None:
            raise OpdError(f"teacher {self.name!r} at {self.url} reports no vocab_size and no tokenizer was given "
                           "to compare with")
        probe = "The teacher and the student must share 1 tokenizer: 2 + 2 = 4."
        theirs = self._call("/tokenize", {"model": self.model, "prompt": probe, "add_special_tokens": False})
        ours = tokenizer(probe, add_special_tokens=False)["input_ids"]
        if list(theirs.get("tokens", [])) != list(ours):
            raise OpdError(f"teacher {self.name!r} at {self.url} tokenizes differently from the student; they "
                           "must share a tokenizer")

    def score(self, tokens, full_mask, *, prompt_len: int, temperature: float, what: str, topk: int = 0):
        """tokens, full_mask [B, P+N] (host) -> what="logprobs": [B, N] float32 log q(y_t); "topk":
        (log-probs [B, N, k] float32, ids [B, N, k] int32); zeros past each row's end."""
        if what not in ("logprobs", "topk"):
            raise OpdError(f"a served teacher hands over log-probs or top-k, not {what}; use loss.estimator_type "
                           "sampled or topk")
        tokens, full_mask = np.asarray(tokens), np.asarray(full_mask)
        b, total = tokens.shape
        n = total - prompt_len
        rows, firsts = [], []
        for i in range(b):
            keep = full_mask[i] > 0
            rows.append([int(t) for t in tokens[i][keep]])
            firsts.append(int(keep[:prompt_len].sum()))  # index of the first completion token in the row
        k = max(topk, 1) if what == "topk" else 1  # log-probs only: the sampled token comes with any k
        reply = self._call("/v1/completions", {"model": self.model, "prompt": rows, "max_tokens": 1,
                                               "prompt_logprobs": k, "temperature": temperature})
        choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != b:
            raise OpdError(f"teacher {self.name!r} at {self.url} answered {len(choices)} rows of {b}")
        lp = np.zeros((b, n), np.float32)
        top_lp, top_id = np.zeros((b, n, k), np.float32), np.zeros((b, n, k), np.int32)
        mask_new = full_mask[:, prompt_len:] > 0
        for i, c in enumerate(choices):
            entries = c.get("prompt_logprobs")
            if not isinstance(entries, list) or len(entries) != len(rows[i]):
                raise OpdError(f"teacher {self.name!r} at {self.url}: row {i} has {len(rows[i])} tokens but the "
                               f"reply's prompt_logprobs has {len(entries) if isinstance(entries, list) else 'none'}")
            for j in range(int(mask_new[i].sum())):
                entry = entries[firsts[i] + j]
                tok = rows[i][firsts[i] + j]
                try:
                    lp[i, j] = entry[str(tok)]["logprob"]
                    ranked = sorted(((v["logprob"], int(t)) for t, v in entry.items()), reverse=True)[:k]
                except (KeyError, TypeError, ValueError, AttributeError):
                    raise OpdError(f"teacher {self.name!r} at {self.url}: malformed prompt_logprobs at row {i}, "
                                   f"position {firsts[i] + j}") from None
                top_lp[i, j], top_id[i, j] = [x for x, _ in ranked], [t for _, t in ranked]
        self.payload_tokens += int(mask_new.sum())
        return lp if what == "logprobs" else (top_lp, top_id)

    @property
    def bytes_per_token(self) -> float:
        return self.payload_bytes / max(self.payload_tokens, 1)


# ----------------------------------------------------------------------------- server


def _handler(score, vocab_size: int, name: str, tokenizer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, obj):
            raw = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": name, "object": "model",
                                                                   "owned_by": "opd-jax", "vocab_size": vocab_size}]})
            self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path.rstrip("/") == "/tokenize" and tokenizer is not None:
                    return self._send(200, {"tokens": tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]})
                if self.path.rstrip("/") != "/v1/completions":
                    return self._send(404, {"error": f"no route {self.path}"})
                prompts = body["prompt"]
                prompts = [prompts] if prompts and isinstance(prompts[0], int) else prompts
                k = int(body.get("prompt_logprobs") or 0)
                if int(body.get("max_tokens", 1)) != 1 or k < 1 or not prompts:
                    return self._send(400, {"error": "this server scores prompts only: max_tokens 1, prompt_logprobs >= 1"})
                choices = [{"index": i, "text": "", "finish_reason": "length",
                            "prompt_logprobs": score(p, k, float(body.get("temperature", 1.0)))}
                           for i, p in enumerate(prompts)]
                self._send(200, {"object": "text_completion", "model": name, "choices": choices})
            except (KeyError, TypeError, ValueError) as e:
                self._send(400, {"error": f"bad request: {e}"})

    return Handler


def make_scorer(model):
    """score(ids, k, temperature) -> vLLM-style prompt_logprobs of one prompt (a list of ids), from an
    opd_jax Transformer: entry 0 is None; entry j holds the top k and token j at position j."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def logprobs(state, ids, mask, temperature):  # [1, T] -> [T-1, V]: row j-1 is the distribution of token j
        m = nnx.merge(graphdef, state)
        h = m.completion_hidden(ids, mask, 1)
        return jax.nn.log_softmax(m.logits(h).astype(jnp.float32) / temperature, -1)[0]

    lock = threading.Lock()

    def score(ids, k, temperature):
        ids = [int(t) for t in ids]
        n = 1 << max(3, (len(ids) - 1).bit_length())  # padded to a power of two: few compiled shapes
        padded, mask = np.zeros((1, n), np.int32), np.zeros((1, n), np.int32)
        padded[0, :len(ids)], mask[0, :len(ids)] = ids, 1
        with lock:
            lp = np.asarray(logprobs(state, jnp.asarray(padded), jnp.asarray(mask), jnp.float32(temperature)))
        out = [None]
        for j in range(1, len(ids)):
            row = lp[j - 1]
            top = np.argsort(-row, kind="stable")[:k]
            entry = {str(int(t)): {"logprob": float(row[t]), "rank": r + 1, "decoded_token": None}
                     for r, t in enumerate(top)}
            tok = ids[j]
            if str(tok) not in entry:
                entry[str(tok)] = {"logprob": float(row[tok]), "rank": int((row > row[tok]).sum()) + 1,
                                   "decoded_token": None}
            out.append(entry)
        return out

    return score


def serve(model, port: int, host: str = "127.0.0.1", name: str = "teacher", tokenizer=None) -> ThreadingHTTPServer:
    """Start serving `model` (an opd_jax Transformer) on host:port in a background thread -> the server
    (call .shutdown() to stop)."""
    server = ThreadingHTTPServer((host, port), _handler(make_scorer(model), model.cfg.vocab_size, name, tokenizer))
    threading.Thread(target=server.serve_forever, name="opd-teacher-server", daemon=True).start()
    return server
