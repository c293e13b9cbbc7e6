"""Served teachers that cannot hang or poison a run (loopback fake servers only): one deadline for a
whole call, replies validated before the loss, no redirects, /v1 URLs, SIGTERM during a served call,
and `opd-jax serve-teacher` answering bad requests with a 4xx and staying up."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from opd_jax.config import load_config
from opd_jax.errors import OpdError
from opd_jax.models import save_model
from opd_jax.serving import ServedTeacher
from opd_jax.teacher_server import serve

from conftest import tiny_model, tiny_overrides

VOCAB = 64


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny teacher served by `serve` (short read timeout), its folder and URL."""
    model = tiny_model(11)
    path = save_model(model, tmp_path_factory.mktemp("faults") / "teacher")
    server = serve(model, 0, read_timeout=1.0)
    yield model, path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class Fake:
    """A server on 127.0.0.1 whose replies come from `answer(path, body) -> (status, headers, bytes)`, or
    ("trickle", bytes): one byte every `every` seconds. Requests are counted by path."""

    def __init__(self, answer, every=1.0):
        fake = self
        self.answer, self.calls, self.every, self.posted = answer, {}, every, threading.Event()

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _go(self, body):
                fake.calls[self.path] = fake.calls.get(self.path, 0) + 1
                out = fake.answer(self.path, body)
                if self.path.endswith("/completions"):
                    fake.posted.set()
                try:
                    if out[0] == "trickle":
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(out[1])))
                        self.end_headers()
                        for byte in out[1]:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(fake.every)
                        return
                    status, headers, raw = out
                    self.send_response(status)
                    for k, v in {"Content-Length": str(len(raw)), **headers}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:  # the client hung up
                    pass

            def do_GET(self):
                self._go(None)

            def do_POST(self):
                self._go(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _json(obj, status=200):
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def _forward(url, path, body):
    """The real server's answer to (path, body)."""
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return 200, {"Content-Type": "application/json"}, r.read()


def _batch(seed=0, b=3, p=4, n=5):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, VOCAB, (b, p + n)).astype(np.int32)
    mask = np.ones((b, p + n), np.int32)
    mask[0, :2] = 0
    mask[1, p + 2:] = 0
    return np.where(mask == 1, tokens, 0), mask


# ----------------------------------------------------------------------------- the client


def test_a_trickling_reply_meets_one_deadline_for_the_whole_call():
    """1 byte every 0.5 s never trips a per-read timeout; the whole call, retries included, ends at the
    2 s deadline with one line."""
    fake = Fake(lambda path, body: ("trickle", b'{"choices": []}' * 10), every=0.5)
    try:
        client = ServedTeacher("slow", fake.url, timeout=2.0, retries=5, backoff=0.1)
        t0 = time.monotonic()
        with pytest.raises(OpdError) as e:
            client.score_ids(*_batch(), prompt_len=4, temperature=1.0, what="logprobs")
        took = time.monotonic() - t0
    finally:
        fake.close()
    assert took < 3.5, took
    msg = str(e.value)
    assert "'slow'" in msg and fake.url in msg and "within the 2 s deadline" in msg and "\n" not in msg


def test_the_backoff_is_capped_and_inside_the_deadline():
    """A dead port with 20 retries and a 3 s deadline stops within it (uncapped doubling from 0.5 s
    would wait 0.5 * (2^20 - 1) s)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    client = ServedTeacher("gone", f"http://127.0.0.1:{port}", timeout=3.0, retries=20)
    t0 = time.monotonic()
    with pytest.raises(OpdError, match="'gone' at .* failed after [0-9]+ tries"):
        client.check(VOCAB)
    assert time.monotonic() - t0 < 4.0


def _scored_reply(real_url, mutate):
    """A fake whose /v1/completions answer is the real server's, passed through mutate(reply dict)."""
    def answer(path, body):
        status, headers, raw = _forward(real_url, path, body)
        if path.endswith("/completions"):
            reply = json.loads(raw)
            mutate(reply)
            return _json(reply)
        return status, headers, raw
    return Fake(answer)


def _first_scored(reply, row=0):
    entries = reply["choices"][row]["prompt_logprobs"]
    return next(e for e in entries[1:] if e)  # the first entry the client reads (row 0's prompt is padded 2 of 4)


def _set_all(reply, key, value):
    for c in reply["choices"]:
        for e in c["prompt_logprobs"][1:]:
            for v in e.values():
                v[key] = value


def _dup(reply):
    entries = reply["choices"][0]["prompt_logprobs"]
    for j in range(1, len(entries)):
        first = next(iter(entries[j]))
        entries[j]["0" + first] = dict(entries[j][first])


def _only_sampled(reply):
    for c, row in zip(reply["choices"], reply["_rows"]):
        for j in range(1, len(row)):
            c["prompt_logprobs"][j] = {str(row[j]): c["prompt_logprobs"][j][str(row[j])]}


def _drop_sampled(reply):
    for c, row in zip(reply["choices"], reply["_rows"]):
        for j in range(1, len(row)):
            c["prompt_logprobs"][j].pop(str(row[j]))
            c["prompt_logprobs"][j]["1"] = {"logprob": -30.0}


def _negative_id(reply):
    for c in reply["choices"]:
        for e in c["prompt_logprobs"][1:]:
            e["-3"] = {"logprob": -20.0}


def _past_vocab(reply):
    for c in reply["choices"]:
        for e in c["prompt_logprobs"][1:]:
            e[str(VOCAB + 5)] = {"logprob": -20.0}


def _too_much_mass(reply):
    for c in reply["choices"]:
        for e in c["prompt_logprobs"][1:]:
            for v in e.values():
                v["logprob"] = -0.1


BAD = {
    "positive log-probs": (lambda r: _set_all(r, "logprob", 5.0), "log-prob 5.0 is above 0"),
    "NaN log-probs": (lambda r: _set_all(r, "logprob", float("nan")), "log-prob nan is not finite"),
    "a string log-prob": (lambda r: _set_all(r, "logprob", "-1"), "is not a number"),
    "id -3": (_negative_id, "id -3 is outside the vocabulary"),
    "an id past the vocabulary": (_past_vocab, f"id {VOCAB + 5} is outside the vocabulary"),
    "the same id twice": (_dup, "appears twice"),
    "one entry where k are asked": (_only_sampled, "1 ids where the top 8 were asked for"),
    "the sampled token missing": (_drop_sampled, "the sampled token .* is missing"),
    "probabilities over 1": (_too_much_mass, "the probabilities sum to .* > 1"),
    "choices not a list": (lambda r: r.update(choices="abc"), "'choices' must be a list of 3 objects"),
    "two choices of three": (lambda r: r["choices"].pop(), "'choices' must be a list of 3 objects"),
    "an index twice": (lambda r: r["choices"][1].update(index=0), r"indices are \[0, 0, 2\]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_reply_is_retried_then_stops_in_one_line_naming_the_place(real, case):
    """Nothing from a bad reply reaches the caller: every try is refused, then one line names the
    teacher, the URL, the row and position, and what was wrong."""
    mutate, what = BAD[case]
    _, _, url = real
    tokens, mask = _batch()
    rows = [[int(t) for t in tokens[i][mask[i] > 0]] for i in range(3)]

    def with_rows(reply):
        reply["_rows"] = rows
        mutate(reply)

    fake = _scored_reply(url, with_rows)
    try:
        client = ServedTeacher("bad", fake.url, timeout=20, retries=1, backoff=0.01, vocab_size=VOCAB)
        with pytest.raises(OpdError) as e:
            client.score_ids(tokens, mask, prompt_len=4, temperature=1.0, what="topk", topk=8)
    finally:
        fake.close()
    msg = str(e.value)
    assert fake.calls["/v1/completions"] == 2  # retried once
    assert "'bad'" in msg and fake.url in msg and "\n" not in msg
    import re
    assert re.search(what, msg), msg
    if "position" in what or case not in ("choices not a list", "two choices of three", "an index twice"):
        assert "row " in msg and "position " in msg


def test_reordered_choices_are_put_back_in_row_order(real):
    _, _, url = real
    fake = _scored_reply(url, lambda r: r["choices"].reverse())
    try:
        tokens, mask = _batch()
        got = ServedTeacher("t", fake.url, vocab_size=VOCAB).score_ids(tokens, mask, prompt_len=4, temperature=1.0,
                                                                    what="logprobs")
        ref = ServedTeacher("t", url, vocab_size=VOCAB).score_ids(tokens, mask, prompt_len=4, temperature=1.0,
                                                              what="logprobs")
    finally:
        fake.close()
    np.testing.assert_array_equal(got, ref)


def test_a_redirect_is_not_followed(real):
    """A 302 on /v1/models pointing at another server: refused in one line, the other server never asked."""
    other = Fake(lambda path, body: _json({"data": [{"id": "t", "vocab_size": VOCAB}]}))
    fake = Fake(lambda path, body: (302, {"Location": other.url + path}, b""))
    try:
        with pytest.raises(OpdError, match="HTTP 302 .* redirects are not followed"):
            ServedTeacher("t", fake.url, retries=3).check(VOCAB)
        assert other.calls == {} and fake.calls == {"/v1/models": 1}  # a redirect is not retried either
    finally:
        fake.close()
        other.close()


def test_the_openai_client_form_of_the_url_is_accepted(real):
    """http://host:port/v1 (what vLLM users type) reaches /v1/completions, not /v1/v1/completions."""
    _, _, url = real
    tokens, mask = _batch()
    kw = dict(prompt_len=4, temperature=1.0, what="logprobs")
    a = ServedTeacher("t", url + "/v1")
    a.check(VOCAB)
    np.testing.assert_array_equal(a.score_ids(tokens, mask, **kw), ServedTeacher("t", url + "/").score_ids(tokens, mask, **kw))


@pytest.mark.parametrize("models, what", [
    ({"data": [{"id": "t", "vocab_size": "sixty-four"}]}, "vocab_size 'sixty-four' is not a whole number"),
    ({"data": {}}, "no list of models"),
    ({"data": [{"id": "t", "vocab_size": True}]}, "vocab_size True is not a whole number"),
])
def test_a_bad_model_list_is_one_line(models, what):
    fake = Fake(lambda path, body: _json(models))
    try:
        with pytest.raises(OpdError, match=what) as e:
            ServedTeacher("t", fake.url, retries=0).check(VOCAB)
        assert "\n" not in str(e.value)
    finally:
        fake.close()


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("over, what", [
    ({"teachers": "[{name: t, url: 'http://127.0.0.1:1', timeout: 0}]"}, r"teachers\[0\] \('t'\).timeout must be a finite"),
    ({"teachers": "[{name: t, url: 'http://127.0.0.1:1', timeout: -5}]"}, "timeout must be a finite number"),
    ({"teachers": "[{name: t, url: 'http://127.0.0.1:1', timeout: .nan}]"}, "timeout must be a finite number"),
    ({"teachers": "[{name: t, url: 'http://127.0.0.1:1', retries: -1}]"}, "retries must be a whole number >= 0"),
    ({"teachers": "[{name: t, url: 'ftp://127.0.0.1:1'}]"}, "is not an http"),
    ({"teachers": "[{name: t, url: 'http://127.0.0.1:99999'}]"}, "is not an http"),
    ({"teachers": "[{name: t, path: self, privileged: answer, privileged_template: '{prompt} {answer} {extra}'}]"},
     r"privileged_template has field \{extra\}"),
    ({"teachers": "[{name: t, path: self, privileged: answer, privileged_template: '{prompt {answer}'}]"},
     "is not a template"),
    ({"data.max_privileged_len": -5}, "data.max_privileged_len must be >= 0"),
    ({"train.max_staleness": "true"}, "train.max_staleness: expected int, got True"),
    ({"train.max_staleness": 1.5}, "train.max_staleness: expected int"),
])
def test_teacher_and_data_numbers_are_checked_before_anything_is_written(tmp_path, over, what):
    over = {"routing": "{addition: t, reverse: t, sort: t}", **over} if "teachers" in over else over
    with pytest.raises(OpdError, match=what) as e:
        load_config(None, tiny_overrides(tmp_path / "run", **over))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_a_privileged_row_without_an_answer_is_refused_when_the_file_is_read(tmp_path):
    """Named by file and row before the run folder exists (it used to surface at the step that drew it)."""
    from opd_jax.train import train

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "add:1+2=", "answer": "3", "domain": "addition"},
        {"prompt": "add:4+4=", "domain": "addition"},
        {"prompt": "rev:ab=", "domain": "reverse"}]) + "\n")
    cfg = load_config(None, tiny_overrides(
        tmp_path / "run", **{"data.path": str(data), "data.domains": "[]",
                             "teachers": "[{name: p, path: self, privileged: answer}, {name: s, path: self}]",
                             "routing": "{addition: p, reverse: s}"}))
    with pytest.raises(OpdError, match=f"{data} row 2: domain 'addition' goes to a privileged teacher"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_the_staleness_histogram_keeps_a_handful_of_keys():
    from opd_jax.rollouts import staleness_histogram

    h = staleness_histogram([0, 1, 1, 7, 900, 1001], k=1000)
    assert h == {"rollout/staleness_0": 1, "rollout/staleness_1": 2, "rollout/staleness_2": 0,
                 "rollout/staleness_3": 0, "rollout/staleness_4plus": 2}  # 1001 is past k: dropped, not counted
    assert staleness_histogram([0, 1, 1, 2], k=1) == {"rollout/staleness_0": 1, "rollout/staleness_1": 2}


# ----------------------------------------------------------------------------- serve-teacher


def _raw(url, request: bytes, wait=5.0) -> bytes:
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(request)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except socket.timeout:
            pass
    return out


def _post(body: bytes, length) -> bytes:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n".encode()
    return head + b"\r\n" + body


@pytest.mark.parametrize("length, status", [(None, 411), (-1, 400), ("abc", 400), (10 ** 12, 413), ("more", 408)])
def test_serve_teacher_answers_a_bad_content_length_and_stays_up(real, length, status):
    """Raw sockets: a missing, negative, non-numeric, huge or lying (larger than the body) Content-Length
    gets its 4xx and a JSON error (the lying one after the 1 s read timeout); a good request follows."""
    _, _, url = real
    body = json.dumps({"prompt": [[3, 4, 5]], "max_tokens": 1, "prompt_logprobs": 2}).encode()
    t0 = time.monotonic()
    reply = _raw(url, _post(body, len(body) + 10 if length == "more" else length))
    assert reply.startswith(f"HTTP/1.0 {status} ".encode()) or reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:80]
    assert "error" in json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert time.monotonic() - t0 < 4
    ok = _raw(url, _post(body, len(body)))
    assert b" 200 " in ok.split(b"\r\n")[0]


@pytest.mark.parametrize("change, what", [
    ({"prompt": [[3, VOCAB]]}, f"id {VOCAB}, outside the vocabulary"),
    ({"prompt": [[3, -1, 4]]}, "id -1, outside the vocabulary"),
    ({"prompt": [[3, 1.5]]}, "id 1.5, outside"),
    ({"prompt": [list(range(3, 3 + 65))]}, "65 tokens, past the model's context of 64"),
    ({"temperature": -1}, "temperature must be a finite number > 0"),
    ({"temperature": 0}, "temperature must be a finite number > 0"),
    ({"prompt_logprobs": 0}, "prompt_logprobs must be a whole number"),
    ({"max_tokens": 5}, "max_tokens must be 1"),
    ({"prompt": "text"}, "prompt must be a list of token ids"),
])
def test_serve_teacher_refuses_bad_requests_with_a_400(real, change, what):
    _, _, url = real
    body = {"model": "t", "prompt": [[3, 4, 5]], "max_tokens": 1, "prompt_logprobs": 2, **change}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and what in json.loads(e.value.read())["error"]


def test_serve_teacher_at_a_small_temperature_gives_finite_scores(real):
    model, _, url = real
    tokens, mask = _batch()
    lp = ServedTeacher("t", url, vocab_size=VOCAB).score_ids(tokens, mask, prompt_len=4, temperature=1e-3,
                                                         what="topk", topk=4)[0]
    assert np.isfinite(lp).all() and (lp <= 1e-4).all()  # float32 rounding of log-sum-exp: a few 1e-6 above 0


def test_serve_teacher_refuses_a_port_out_of_range(real, capsys):
    from opd_jax.cli import main

    _, path, _ = real
    for port in ("70000", "-1"):
        assert main(["serve-teacher", "--model", str(path), "--port", port]) == 2
        assert capsys.readouterr().err.strip() == f"opd-jax: error: --port must be in [0, 65535] (0 = any free port), got {port}"


# ----------------------------------------------------------------------------- SIGTERM during a served call


@pytest.mark.parametrize("staleness", [0, 1])
def test_sigterm_during_a_trickling_served_call_stops_the_run_in_seconds(real, tmp_path, staleness):
    """Step 1 is answered; from step 2 on the server trickles. The run (synchronous, and asynchronous)
    exits 0 within a few seconds of SIGTERM, keeps step 1, and says the step was abandoned; the
    deadline (60 s) is far away."""
    _, _, url = real
    state = {"n": 0}

    def answer(path, body):
        if path.endswith("/completions"):
            state["n"] += 1
            if state["n"] > 1:
                return "trickle", b" " * 1000
        return _forward(url, path, body)

    fake = Fake(answer, every=1.0)
    out = tmp_path / "run"
    over = tiny_overrides(out, **{"teachers": f"[{{name: t, url: '{fake.url}', timeout: 60}}]",
                                  "routing": "{addition: t, reverse: t, sort: t}", "loss.estimator_type": "sampled",
                                  "train.steps": 6, "train.checkpoint_every": 100, "train.eval_every": 100,
                                  "train.max_staleness": staleness})
    env = {**os.environ, "XLA_FLAGS": os.environ["OPD_TEST_XLA_FLAGS"]}
    proc = subprocess.Popen([sys.executable, "-m", "opd_jax.cli", "train", *over], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while state["n"] < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert state["n"] >= 2, proc.communicate()[1][-2000:]
        time.sleep(1.0)  # inside the trickle
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
        fake.close()
    assert proc.returncode == 0, stderr[-2000:]
    assert took < 10, took
    assert "was abandoned; the checkpoint at step 1 stands" in stdout, stdout[-1000:]
    from opd_jax import checkpoint as ckpt
    assert ckpt.manager(out / "checkpoints", 2).latest_step() == 1


@pytest.mark.parametrize("staleness", [0, 1])
def test_a_run_against_a_trickling_server_stops_at_the_deadline(real, tmp_path, staleness):
    """teachers[].timeout 3: from the second scoring call the server trickles; the run (synchronous and
    asynchronous) stops with one line naming the teacher within the deadline + a few seconds of that
    call, and the first step's checkpoint stands."""
    from opd_jax.train import train

    _, _, url = real
    seen = {"n": 0, "t": None}

    def answer(path, body):
        if path.endswith("/completions"):
            seen["n"] += 1
            if seen["n"] > 1:
                seen["t"] = seen["t"] or time.monotonic()
                return "trickle", b" " * 1000
        return _forward(url, path, body)

    fake = Fake(answer, every=0.5)
    try:
        cfg = load_config(None, tiny_overrides(tmp_path / "run", **{
            "teachers": f"[{{name: slow, url: '{fake.url}', timeout: 3, retries: 4}}]",
            "routing": "{addition: slow, reverse: slow, sort: slow}", "loss.estimator_type": "sampled",
            "train.steps": 4, "train.checkpoint_every": 1, "train.eval_every": 100,
            "train.max_staleness": staleness}))
        with pytest.raises(OpdError) as e:
            train(cfg)
        took = time.monotonic() - seen["t"]
    finally:
        fake.close()
    msg = str(e.value)
    assert "'slow'" in msg and fake.url in msg and "within the 3 s deadline" in msg and "\n" not in msg
    assert took < 3 + 3, took
    from opd_jax import checkpoint as ckpt
    assert ckpt.manager(tmp_path / "run" / "checkpoints", 2).latest_step() == 1
