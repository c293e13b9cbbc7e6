"""`opd-jax serve-teacher`: a JAX teacher behind the completions endpoint with `prompt_logprobs` (the
protocol and the client that reads it: `opd_jax.serving`). It answers POST /v1/completions (prompt ids
scored, `max_tokens` 1), GET /v1/models (the vocabulary size) and POST /tokenize. A bad request gets a
4xx with a JSON error naming the problem and the server stays up: bodies over `MAX_BODY` are refused
unread (413), a request that takes longer than `READ_TIMEOUT` to arrive ends there (408)."""

from __future__ import annotations

import json
import math
import socket
import threading

import numpy as np

from opd_jax.errors import OpdError

MAX_BODY = 64 << 20  # bytes: a longer request body is refused (413) unread
READ_TIMEOUT = 10.0  # seconds a request may take to arrive (a lying Content-Length ends here: 408)


class BadRequest(Exception):
    def __init__(self, code: int, msg: str):
        super().__init__(msg)
        self.code = code


def check_request(body, vocab_size: int, context: int) -> tuple[list, int, float]:
    """A /v1/completions body -> (rows of ids, k, temperature), or BadRequest (400) naming the problem:
    rows of whole-number ids in [0, vocab_size), none empty nor longer than the context; max_tokens 1;
    prompt_logprobs a whole number in [1, vocab_size]; temperature finite and > 0."""
    if not isinstance(body, dict):
        raise BadRequest(400, "the body must be a JSON object")
    prompts = body.get("prompt")
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) for p in prompts):
        raise BadRequest(400, "prompt must be a list of token ids or a list of such lists (this server scores ids)")
    for i, p in enumerate(prompts):
        if not p:
            raise BadRequest(400, f"prompt {i} is empty")
        if len(p) > context:
            raise BadRequest(400, f"prompt {i} has {len(p)} tokens, past the model's context of {context}")
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise BadRequest(400, f"prompt {i} holds id {bad[0]!r}, outside the vocabulary [0, {vocab_size})")
    mt, k, temp = body.get("max_tokens", 1), body.get("prompt_logprobs"), body.get("temperature", 1.0)
    if mt != 1 or isinstance(mt, bool):
        raise BadRequest(400, "this server scores prompts only: max_tokens must be 1")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise BadRequest(400, f"prompt_logprobs must be a whole number in [1, {vocab_size}], got {k!r}")
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not math.isfinite(temp) or temp <= 0:
        raise BadRequest(400, f"temperature must be a finite number > 0, got {temp!r}")
    return prompts, k, float(temp)


def _handler(score, vocab_size: int, context: int, name: str, tokenizer, max_body: int, read_timeout: float):
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        timeout = read_timeout  # every read of the request (headers and body)

        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, obj):
            raw = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            if code >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, {"object": "list", "data": [{
                    "id": name, "object": "model", "owned_by": "opd-jax", "vocab_size": vocab_size,
                    "max_model_len": context}]})
            self._send(404, {"error": f"no route {self.path}"})

        def _body(self):
            raw_len = self.headers.get("Content-Length")
            if raw_len is None:
                raise BadRequest(411, "a Content-Length header is required")
            try:
                n = int(raw_len)
            except ValueError:
                raise BadRequest(400, f"Content-Length {raw_len!r} is not a number") from None
            if n < 0:
                raise BadRequest(400, f"Content-Length {n} is negative")
            if n > max_body:
                raise BadRequest(413, f"the body of {n} bytes is over the {max_body}-byte cap")
            try:
                raw = self.rfile.read(n)
            except (TimeoutError, socket.timeout):
                raise BadRequest(408, f"the body did not arrive within {read_timeout:g} s "
                                      f"(Content-Length {n} larger than the body?)") from None
            if len(raw) != n:
                raise BadRequest(400, f"the body has {len(raw)} bytes, not the {n} of its Content-Length")
            try:
                return json.loads(raw)
            except ValueError as e:
                raise BadRequest(400, f"the body is not JSON: {e}") from None

        def do_POST(self):
            try:
                route = self.path.rstrip("/")
                if route not in ("/tokenize", "/v1/completions") or (route == "/tokenize" and tokenizer is None):
                    return self._send(404, {"error": f"no route {self.path}"})
                body = self._body()
                if route == "/tokenize":
                    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
                        raise BadRequest(400, "prompt must be a string")
                    return self._send(200, {"tokens": tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]})
                rows, k, temperature = check_request(body, vocab_size, context)
                choices = [{"index": i, "text": "", "finish_reason": "length", "prompt_logprobs": entries}
                           for i, entries in enumerate(score(rows, k, temperature))]
                self._send(200, {"object": "text_completion", "model": name, "choices": choices})
            except BadRequest as e:
                self._send(e.code, {"error": str(e)})
            except Exception as e:  # the server stays up and the client gets an answer
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

    return Handler


def make_scorer(model):
    """score(rows, k, temperature) -> per row, vLLM-style prompt_logprobs (entry 0 None; entry j the
    top k at position j and token j). All rows in one batched forward through the local teachers'
    chunked scorer (`teachers.teacher_scores`, no [T, V] log-softmax), padded to powers of two so few
    shapes compile. A token outside the top k gets rank null (its rank is not computed)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from opd_jax.teachers import teacher_scores

    graphdef, state = nnx.split(model)
    lock = threading.Lock()

    def score(rows, k, temperature):
        b = 1 << max(0, (len(rows) - 1).bit_length())
        t = 1 << max(3, (max(map(len, rows)) - 1).bit_length())
        tokens, mask = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)], mask[i, :len(r)] = r, 1
        kw = dict(prompt_len=1, temperature=float(temperature))  # position 0 is the "prompt": every later one scored
        with lock:  # one forward gives both the sampled tokens' log-probs and the top k
            tok_lp, (top_lp, top_id) = jax.tree.map(np.asarray, teacher_scores(
                graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), what="logprobs+topk", topk=k, **kw))
        out = []
        for i, r in enumerate(rows):
            entries = [None]
            for j in range(1, len(r)):
                entry = {str(int(x)): {"logprob": float(v), "rank": q + 1, "decoded_token": None}
                         for q, (v, x) in enumerate(zip(top_lp[i, j - 1], top_id[i, j - 1]))}
                entry.setdefault(str(r[j]), {"logprob": float(tok_lp[i, j - 1]), "rank": None, "decoded_token": None})
                entries.append(entry)
            out.append(entries)
        return out

    return score


def serve(model, port: int, host: str = "127.0.0.1", name: str = "teacher", tokenizer=None, *,
          max_body: int = MAX_BODY, read_timeout: float = READ_TIMEOUT):
    """Start serving `model` (an opd_jax Transformer) on host:port in a background thread -> the server
    (call .shutdown() to stop). Bad requests get a 4xx with a JSON error; the server stays up."""
    from http.server import ThreadingHTTPServer

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise OpdError(f"port must be a whole number in [0, 65535], got {port!r}")
    handler = _handler(make_scorer(model), model.cfg.vocab_size, model.cfg.max_position_embeddings, name, tokenizer,
                       max_body, read_timeout)
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="opd-teacher-server", daemon=True).start()
    return server
