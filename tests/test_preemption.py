"""Preemption and crashes: a run killed (SIGKILL) or told to stop (SIGTERM) mid-run resumes to exactly the
parameters of an uninterrupted run (`opd_jax.preemption`, `hooks.Checkpoints`, `train`)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from opd_jax.config import load_config

from conftest import random_teacher, tiny_overrides


def _final_params(out):
    from opd_jax.train import restore_run_params

    params = restore_run_params(out)[1]
    return {"/".join(map(str, k)): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


STEPS = 8


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """(env, command, args(out_dir, checkpoint_every), the reference run's folder) for `opd-jax train` in a
    subprocess on one CPU device (a random teacher, so every step really moves the parameters), after one
    uninterrupted reference run of STEPS steps that both tests compare with (how often a run checkpoints
    does not change its parameters)."""
    tmp = tmp_path_factory.mktemp("preemption")
    common = tiny_overrides(tmp / "x", **{"train.steps": STEPS, "train.eval_every": 100, **random_teacher(tmp)})
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ["OPD_TEST_XLA_FLAGS"] + " --xla_force_host_platform_device_count=1"}
    cli = [sys.executable, "-m", "opd_jax.cli", "train"]

    def args(out, checkpoint_every: int = 1):
        return [a if not a.startswith("train.out_dir=") else f"train.out_dir={out}" for a in common] + [
            f"train.checkpoint_every={checkpoint_every}"]

    subprocess.run(cli + args(tmp / "full"), env=env, check=True, capture_output=True)
    return env, cli, args, tmp / "full"


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, runner):
    """A random teacher (not `self`), so every step really moves the parameters."""
    steps = STEPS
    env, cli, args, full = runner
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli + args(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (killed / "checkpoints" / "3").exists():
            assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    done = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert done and done[-1] < steps
    subprocess.run(cli + args(killed) + ["--resume"], env=env, check=True, capture_output=True)
    a, b = _final_params(full), _final_params(killed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    from opd_jax.train import build_student
    from flax import nnx
    cfg = load_config(full / "config.yaml")
    p0 = nnx.to_pure_dict(nnx.state(build_student(cfg.student, cfg.train.seed)))
    start = {"/".join(map(str, k)): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(p0)}
    assert start.keys() == a.keys()
    moved = [k for k in a if np.max(np.abs(a[k] - start[k])) > 1e-4]
    assert len(moved) == len(a), sorted(set(a) - set(moved))  # every tensor moved well beyond rounding
    steps_logged = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))


@pytest.mark.slow
def test_sigterm_saves_the_step_in_flight_exits_zero_and_resumes_exactly(tmp_path, runner):
    """Preemption notice: SIGTERM while the run trains (checkpoints every 4 steps). The step in flight
    finishes, is saved at once (off the checkpoint schedule), the process exits 0, no completed step is
    lost (the saved step is the last one logged), and --resume ends equal to an uninterrupted run."""
    steps = STEPS
    env, cli, args, full = runner
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(cli + args(stopped, 4), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 300
        metrics = stopped / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 1):  # training has begun
            assert proc.poll() is None and time.time() < deadline, "run ended before the signal"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "preempted (SIGTERM): saved step" in out
    saved = sorted(int(p.name) for p in (stopped / "checkpoints").iterdir() if p.name.isdigit())
    logged = [json.loads(x)["step"] for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert saved[-1] == logged[-1] < steps and saved[-1] % 4  # saved on notice, not on the schedule
    subprocess.run(cli + args(stopped, 4) + ["--resume"], env=env, check=True, capture_output=True)
    a, b = _final_params(full), _final_params(stopped)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
