"""Teachers behind a server (loopback only): the vLLM prompt_logprobs protocol, scores equal to
in-process scoring, a run against a served teacher, retries then a one-line error, resume."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from flax import nnx

from opd_jax.config import load_config
from opd_jax.errors import OpdError
from opd_jax.models import save_model
from opd_jax.run import build_run
from opd_jax.serving import ServedTeacher
from opd_jax.teacher_server import serve
from opd_jax.teachers import teacher_scores
from opd_jax.train import train

from conftest import tiny_model, tiny_overrides


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    model = tiny_model(11)
    path = save_model(model, folder / "teacher")
    server = serve(model, 0)
    yield model, path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _batch(seed=0, b=5, p=6, n=7, vocab=64):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab, (b, p + n)).astype(np.int32)
    mask = np.ones((b, p + n), np.int32)
    for i in range(b):
        mask[i, : rng.randint(0, p - 1)] = 0  # left padding
        mask[i, p + rng.randint(1, n + 1):] = 0  # the completion ends
    return np.where(mask == 1, tokens, 0), mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_served_scores_equal_in_process_scores(teacher, temperature):
    """Top-k (k = 4) and sampled-token log-probs over HTTP equal the in-process teacher forward's to 1e-5
    at every completion position."""
    model, _, url = teacher
    graphdef, state = nnx.split(model)
    tokens, mask = _batch()
    client = ServedTeacher("t", url)
    kw = dict(prompt_len=6, temperature=temperature)
    lp, ids = client.score_ids(tokens, mask, what="topk", topk=4, **kw)
    ref_lp, ref_ids = (np.asarray(x) for x in teacher_scores(graphdef, state, tokens, mask, what="topk", topk=4, **kw))
    real = mask[:, 6:] == 1
    np.testing.assert_allclose(lp[real], ref_lp[real], atol=1e-5)
    np.testing.assert_array_equal(ids[real], ref_ids[real])
    sampled = client.score_ids(tokens, mask, what="logprobs", **kw)
    ref = np.asarray(teacher_scores(graphdef, state, tokens, mask, what="logprobs", **kw))
    np.testing.assert_allclose(sampled[real], ref[real], atol=1e-5)
    assert (sampled[~real] == 0).all()
    assert client.bytes_per_token > 0


def _overrides(tmp_path, name, url=None, path=None, **extra):
    t = f"{{name: t, url: '{url}', retries: 1, timeout: 5}}" if url else f"{{name: t, path: {path}}}"
    over = {"teachers": f"[{t}]", "routing": "{addition: t, reverse: t, sort: t}", "loss.estimator_type": "topk",
            "loss.topk": 4, "loss.kind": "forward_kl", **extra}
    return tiny_overrides(tmp_path / name, **over)


@pytest.mark.parametrize("estimator", ["topk", "sampled"])
def test_a_served_teacher_trains_like_the_in_process_one(teacher, tmp_path, estimator):
    """Two steps against the served teacher give the in-process teacher's losses (same samples: the
    student and its seed are the same), and the log reports the payload per token."""
    _, path, url = teacher
    out = {}
    for how, kw in (("served", dict(url=url)), ("local", dict(path=path))):
        run = build_run(load_config(None, _overrides(tmp_path, how, **kw, **{"loss.estimator_type": estimator})))
        losses = []

        class Keep:
            def after_step(self, ctx):
                losses.append(float(ctx.metrics["loss"]))

        from opd_jax.hooks import Logger, SkipCounter
        from opd_jax.train import train_loop
        logger = Logger(run)
        train_loop(run, run.init, [SkipCounter(3), logger, Keep()], start=0, end=2)
        out[how] = losses, logger.last
    np.testing.assert_allclose(out["served"][0], out["local"][0], rtol=1e-5, atol=1e-6)
    assert out["served"][1]["teacher/t/payload_bytes_per_token"] > 0


def test_a_served_teacher_with_another_vocabulary_is_refused(tmp_path):
    other = tiny_model(1, vocab_size=80)
    server = serve(other, 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(OpdError, match="vocabulary 80 but the student has 64"):
            build_run(load_config(None, _overrides(tmp_path, "v", url=url)))
        assert not (tmp_path / "v").exists()
    finally:
        server.shutdown()


def test_full_vocabulary_loss_with_a_served_teacher_is_refused(teacher, tmp_path):
    with pytest.raises(OpdError, match="served .* not hidden states; use loss.estimator_type topk or sampled"):
        build_run(load_config(None, _overrides(tmp_path, "f", url=teacher[2], **{"loss.estimator_type": "full"})))
    with pytest.raises(OpdError, match="served .* not its log-probs at the student's top k; use loss.topk_from teacher"):
        build_run(load_config(None, _overrides(tmp_path, "s", url=teacher[2], **{"loss.estimator_type": "topk",
                                                                               "loss.topk_from": "student"})))


class _Garbage(BaseHTTPRequestHandler):
    calls = 0

    def log_message(self, *a):
        pass

    def do_GET(self):
        self._reply(json.dumps({"data": [{"id": "t", "vocab_size": 64}]}).encode())

    def do_POST(self):
        type(self).calls += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._reply(b"<html>not json")

    def _reply(self, raw):
        self.send_response(200)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def test_a_malformed_reply_is_retried_then_one_line_error():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        client = ServedTeacher("t", url, retries=2, backoff=0.01)
        tokens, mask = _batch()
        with pytest.raises(OpdError) as e:
            client.score_ids(tokens, mask, prompt_len=6, temperature=1.0, what="logprobs")
        assert _Garbage.calls == 3 and "\n" not in str(e.value)
        assert url in str(e.value) and "after 3 tries: malformed reply" in str(e.value)
    finally:
        server.shutdown()


def test_a_server_killed_mid_run_stops_the_run_and_the_checkpoint_resumes(teacher, tmp_path):
    """The server goes away after step 2: the trainer retries, stops with one line naming the URL, keeps
    the step-2 checkpoint; with the server back (same port), --resume finishes the run."""
    model, _, _ = teacher
    server = serve(model, 0)
    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}"
    cfg = load_config(None, _overrides(tmp_path, "k", url=url, **{"train.steps": 4, "train.checkpoint_every": 1,
                                                                 "train.eval_every": 100,
                                                                 "loss.estimator_type": "sampled"}))
    import opd_jax.hooks as hooks

    original = hooks.Checkpoints.after_step

    def after_step(self, ctx):
        original(self, ctx)
        if ctx.done == 2:
            server.shutdown()
            server.server_close()

    hooks.Checkpoints.after_step = after_step
    try:
        with pytest.raises(OpdError) as e:
            train(cfg)
    finally:
        hooks.Checkpoints.after_step = original
    msg = str(e.value)
    assert url in msg and "failed after 2 tries" in msg and "\n" not in msg
    from opd_jax import checkpoint as ckpt
    assert ckpt.manager(tmp_path / "k" / "checkpoints", 2).latest_step() == 2
    again = serve(model, port)
    try:
        last = train(cfg, resume=True)
    finally:
        again.shutdown()
    assert ckpt.manager(tmp_path / "k" / "checkpoints", 2).latest_step() == 4 and np.isfinite(last["loss"])


def test_serve_teacher_cli_serves_until_sigterm(teacher):
    """`opd-jax serve-teacher --model DIR --port 0` prints its address, answers the protocol, stops on
    SIGTERM with exit code 0; a missing folder is a one-line error."""
    import re
    import signal
    import subprocess
    import sys

    _, path, _ = teacher
    proc = subprocess.Popen([sys.executable, "-m", "opd_jax.cli", "serve-teacher", "--model", str(path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)", line).group(1)
        client = ServedTeacher("t", url)
        client.check(64)
        tokens, mask = _batch()
        assert client.score_ids(tokens, mask, prompt_len=6, temperature=1.0, what="logprobs").shape == (5, 7)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    bad = subprocess.run([sys.executable, "-m", "opd_jax.cli", "serve-teacher", "--model", "/nonexistent/x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "opd-jax: error: --model /nonexistent/x does not exist"
