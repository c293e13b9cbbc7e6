"""Two processes on 127.0.0.1 (4 fake CPU devices each, gloo collectives) train the tiny config for
three steps, checkpointing and resuming across processes, and end where one process with 8 devices does."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from opd_jax.config import load_config
from opd_jax.train import restore_run_params, train
from conftest import random_teacher, tiny_overrides

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
    extra = {"train.steps": 3, "train.checkpoint_every": 1, "train.keep_checkpoints": 3, "train.eval_every": 3,
             "optim.name": "sgd", "optim.lr": 0.5, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
             "data.per_domain": 4, **random_teacher(tmp_path)}
    ref = tiny_overrides(tmp_path / "one", **extra)
    train(load_config(None, ref))

    overrides = [o for o in tiny_overrides(tmp_path / "unused", **extra) if not o.startswith("train.out_dir")]
    port, out = _free_port(), tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(out), json.dumps(overrides)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=420)[0] for p in procs]
    finally:
        for p in procs:  # whatever happened, neither process outlives the test
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-12000:]
    lines = [json.loads(t.strip().splitlines()[-1]) for t in outputs]
    assert lines[0]["loss"] == pytest.approx(lines[1]["loss"], rel=1e-6)

    one_log = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two_log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two_log] == [1, 2, 3]  # process 0 alone wrote the log, once per step
    np.testing.assert_allclose([r["loss"] for r in two_log], [r["loss"] for r in one_log], rtol=1e-5)
    assert one_log[0]["loss"] > 1e-3  # a real teacher: the loss and the updates are far from 0
    a, b = restore_run_params(tmp_path / "one")[1], restore_run_params(out)[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_both(tmp_path):
    """A preemption notice reaches only process 1: JAX's preemption sync point makes both processes
    save the same step (off the checkpoint schedule) and exit 0; none waits for a peer that stopped."""
    import time

    steps = 40
    extra = {"train.steps": steps, "train.checkpoint_every": 1000, "train.eval_every": 1000, "mesh.data": 2,
             "mesh.fsdp": 4, "mesh.tensor": 1, "data.per_domain": 4, **random_teacher(tmp_path)}
    overrides = [o for o in tiny_overrides(tmp_path / "unused", **extra) if not o.startswith("train.out_dir")]
    port, out = _free_port(), tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(out), json.dumps(overrides),
                               "preempt"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True) for i in range(2)]
    try:
        deadline = time.time() + 400
        log = out / "metrics.jsonl"
        while not (log.exists() and log.read_text().count("\n") >= 2):  # training is under way
            assert all(p.poll() is None for p in procs) and time.time() < deadline, "ended before the signal"
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGTERM)
        outputs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-6000:]
    saved = [int(t.split("saved step ")[1].split(";")[0]) for t in outputs]
    assert saved[0] == saved[1] < steps
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [saved[0]]
