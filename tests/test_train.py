"""The trainer end to end on a tiny config: every loss mode, routing, errors, checkpoints, export, resume."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import opd_jax
from opd_jax import OpdError
from opd_jax.config import load_config
from opd_jax.models import ModelConfig, init_model, save_model
from opd_jax.run import build_run
from opd_jax.train import export_student, train

from conftest import random_teacher, tiny_overrides

@pytest.mark.parametrize("mode", [
    {"loss.estimator_type": "full", "loss.kind": "reverse_kl"},
    {"loss.estimator_type": "sampled", "loss.kind": "forward_kl", "loss.estimator": "opd_plus"},
    {"loss.estimator_type": "topk", "loss.topk": 4, "loss.kind": "jsd"},
])
def test_self_teacher_scores_zero_divergence_at_the_first_step(tmp_path, mode):
    """At step 1 the student equals its frozen snapshot, so every estimator must see divergence 0:
    a check that teacher scores line up with the student's positions and tokens."""
    cfg = load_config(None, tiny_overrides(tmp_path / "r", **{"train.steps": 1, "data.rollout_slots": 5, **mode}))
    last = train(cfg)
    assert abs(last["on_policy/divergence"]) < 1e-5
    assert last["on_policy/logprob_mismatch"] < 1e-4  # sampler (5 slots refilled for 12 rows) and trainer agree
    assert last["on_policy/tokens"] > 0
    # the logged occupancy: the step's sampled tokens over 5 slots x the decode steps the engine ran
    assert last["rollout/occupancy"] == pytest.approx(last["on_policy/tokens"] / (5 * last["rollout/decode_steps"]))


def test_run_writes_metrics_checkpoints_plots_tensorboard_and_exports(tmp_path):
    out = tmp_path / "run"
    last = train(load_config(None, tiny_overrides(out, **{"train.steps": 4, "train.checkpoint_every": 2,
                                                             "train.eval_every": 2})))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert "eval/addition/accuracy" in recs[1] and "teacher/snap/divergence" in recs[-1]
    for r in recs:  # every log step times its phases (waiting for each), and tokens/s follows from them
        assert min(r[f"time/{k}"] for k in ("sample", "teacher", "update", "host")) > 0 and r["skipped_steps"] == 0
        assert r["time/step"] >= r["time/sample"] + r["time/teacher"] + r["time/update"]
    assert recs[-1]["on_policy/divergence"] > 0  # the student moved away from its snapshot
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert {"loss.png", "divergence.png", "accuracy.png"} <= {p.name for p in (out / "plots").iterdir()}
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert last["eval/mean/accuracy"] == pytest.approx(np.mean([last[f"eval/{d}/accuracy"]
                                                                for d in ("addition", "reverse", "sort")]))
    hf = export_student(out, tmp_path / "hf")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    ours = opd_jax.load_model(hf)
    ids = np.array([[1, 20, 21, 22, 5]])
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(ours(ids)), torch_model(torch.tensor(ids)).logits.numpy(), atol=1e-4)
    assert (hf / "tokenizer.json").exists()


def test_pure_supervised_kd_trains_on_dataset_answers_only(tmp_path):
    """loss.lam=0: no sampling at all; the step is the off-policy divergence on the dataset answers
    (the on/off mixes are pinned against the loss library in test_train_modes)."""
    last = train(load_config(None, tiny_overrides(tmp_path / "r", **{"train.steps": 2, "train.eval_every": 2,
                                                                       "loss.lam": 0.0, **random_teacher(tmp_path)})))
    assert not any(k.startswith("on_policy/") for k in last) and last["tokens_per_s"] == 0.0
    assert last["loss"] == pytest.approx(last["off_policy/divergence"]) and last["off_policy/divergence"] > 1e-3
    assert "time/sample" not in last  # nothing was sampled


def test_routing_and_vocabulary_errors_come_before_compute(tmp_path):
    with pytest.raises(OpdError, match="domain 'sort' has no teacher"):
        build_run(load_config(None, tiny_overrides(tmp_path / "a", routing="{addition: snap, reverse: snap}")))
    with pytest.raises(OpdError, match="teacher 'other', which is not in teachers"):
        build_run(load_config(None, tiny_overrides(tmp_path / "b", routing="{addition: other, reverse: snap, sort: snap}")))
    small = init_model(ModelConfig.for_family("qwen3", vocab_size=80, hidden_size=32, intermediate_size=64,
                                              num_heads=2, num_kv_heads=1, head_dim=16))
    save_model(small, tmp_path / "t80")
    with pytest.raises(OpdError, match="vocabulary 80 but the student has 64"):
        build_run(load_config(None, tiny_overrides(tmp_path / "c", teachers=f"[{{name: t, path: {tmp_path / 't80'}}}]",
                                                 routing="{addition: t, reverse: t, sort: t}")))
    with pytest.raises(OpdError, match="RL \\+ OPD .* needs loss.estimator_type=sampled"):
        build_run(load_config(None, tiny_overrides(tmp_path / "d", **{"loss.rl_alpha": 0.5})))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    bad = init_model(ModelConfig.for_family("qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                                            num_heads=2, num_kv_heads=1, head_dim=16))
    bad.final_norm[...] = bad.final_norm[...] * np.nan
    save_model(bad, tmp_path / "nan_teacher")
    cfg = load_config(None, tiny_overrides(tmp_path / "r", teachers=f"[{{name: t, path: {tmp_path / 'nan_teacher'}}}]",
                                           routing="{addition: t, reverse: t, sort: t}"))
    with pytest.raises(OpdError, match="loss is nan at step 1"):
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_skipped=1)))
    assert not any(p.name.isdigit() for p in (tmp_path / "r" / "checkpoints").iterdir())
    # flags are read only at log steps: with max_skipped=2 and logs every 3 steps the run stops at step 3's
    # read, naming step 2, before step 3's checkpoint is written
    late = load_config(None, tiny_overrides(tmp_path / "late", teachers=f"[{{name: t, path: {tmp_path / 'nan_teacher'}}}]",
                                            routing="{addition: t, reverse: t, sort: t}",
                                            **{"train.max_skipped": 2, "train.log_every": 3, "train.eval_every": 10}))
    with pytest.raises(OpdError, match=r"loss is nan at step 2 \(2 skipped step\(s\) in a row, train.max_skipped=2\)"):
        train(late)
    assert not any(p.name.isdigit() for p in (tmp_path / "late" / "checkpoints").iterdir())


def nan_teacher_at_step(monkeypatch, step: int):
    """Make the teachers' outputs NaN at training step `step` (1-based; on-policy rollouts are collected
    once per step)."""
    from opd_jax.rollouts import Rollouts

    original, calls = Rollouts.finish, []  # every step's batch is built there

    def poisoned(self, *a, **k):
        batch = original(self, *a, **k)
        calls.append(1)
        if len(calls) == step:
            on = batch.arrays["on"]
            batch.arrays["on"] = on._replace(teacher=jax.tree.map(lambda x: x * jnp.nan, on.teacher))
        return batch

    monkeypatch.setattr(Rollouts, "finish", poisoned)


def test_a_non_finite_step_is_skipped_on_device_and_the_run_goes_on(tmp_path, monkeypatch):
    """Step 2's teacher outputs are NaN: its update is not applied (parameters and optimizer state after
    step 2 equal those after step 1), the next log reports one skipped step, and step 3 trains again."""
    from opd_jax.train import restore_run_params

    nan_teacher_at_step(monkeypatch, 2)
    out = tmp_path / "r"
    train(load_config(None, tiny_overrides(out, **{"train.steps": 3, "train.checkpoint_every": 1, "train.eval_every": 10, "train.keep_checkpoints": 3,
                                                   **random_teacher(tmp_path)})))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in recs] == [0, 1, 0] and np.isfinite(recs[2]["loss"])
    params = [jax.tree.leaves(restore_run_params(out, step)[1]) for step in (1, 2, 3)]
    for a, b, c in zip(*params):
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(np.asarray(c)).all()
    assert any(not np.array_equal(b, c) for b, c in zip(params[1], params[2]))


def test_existing_run_needs_resume(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "r", **{"train.steps": 1, "train.checkpoint_every": 1}))
    train(cfg)
    with pytest.raises(OpdError, match="already holds checkpoints.*--resume"):
        train(cfg)
    with pytest.raises(OpdError, match="holds no checkpoint"):
        train(load_config(None, tiny_overrides(tmp_path / "empty")), resume=True)


def _final_params(out):
    from opd_jax.train import restore_run_params

    params = restore_run_params(out)[1]
    return {"/".join(map(str, k)): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def cli_runner(tmp_path, steps: int, checkpoint_every: int):
    """(env, command, args(out_dir)) for `opd-jax train` in a subprocess on one CPU device (a random
    teacher, so every step really moves the parameters), after an uninterrupted reference run into
    tmp_path / "full"."""
    common = tiny_overrides(tmp_path / "x", **{"train.steps": steps, "train.checkpoint_every": checkpoint_every,
                                               "train.eval_every": 100, **random_teacher(tmp_path)})
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ["OPD_TEST_XLA_FLAGS"] + " --xla_force_host_platform_device_count=1"}
    cli = [sys.executable, "-m", "opd_jax.cli", "train"]

    def args(out):
        return [a if not a.startswith("train.out_dir=") else f"train.out_dir={out}" for a in common]

    subprocess.run(cli + args(tmp_path / "full"), env=env, check=True, capture_output=True)
    return env, cli, args


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A random teacher (not `self`), so every step really moves the parameters."""
    steps = 6
    env, cli, args = cli_runner(tmp_path, steps, 1)
    full, killed = tmp_path / "full", tmp_path / "killed"
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
def test_sigterm_saves_the_step_in_flight_exits_zero_and_resumes_exactly(tmp_path):
    """Preemption notice: SIGTERM while the run trains (checkpoints every 4 steps). The step in flight
    finishes, is saved at once (off the checkpoint schedule), the process exits 0, no completed step is
    lost (the saved step is the last one logged), and --resume ends equal to an uninterrupted run."""
    steps = 8
    env, cli, args = cli_runner(tmp_path, steps, 4)
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    proc = subprocess.Popen(cli + args(stopped), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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
    subprocess.run(cli + args(stopped) + ["--resume"], env=env, check=True, capture_output=True)
    a, b = _final_params(full), _final_params(stopped)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_effopd_and_a_sparse_mask_from_the_config(tmp_path):
    from opd_jax.optim import mask_from_patterns, save_mask
    from opd_jax.train import restore_run_params

    from opd_jax.optim import find_state
    from conftest import run_steps

    # optim.effopd_window reaches the trainer's optimizer: after 4 steps two windows have closed
    state, _ = run_steps(build_run(load_config(None, tiny_overrides(tmp_path / "e", **{
        "train.steps": 4, "optim.effopd_window": 2, **random_teacher(tmp_path)}))), 4)
    st = find_state(state.opt_state)
    assert int(st.count) == 0 and bool(st.has_prev) and float(st.cosine) != 0.0
    # a mask that frees only the MLP up-projections: nothing else may move
    params = build_run(load_config(None, tiny_overrides(tmp_path / "m0"))).init.params
    p0 = jax.tree.map(np.asarray, params)
    save_mask(mask_from_patterns(params, ["w_up"]), tmp_path / "mask.safetensors")
    run = tmp_path / "m"
    train(load_config(None, tiny_overrides(run, **{"train.steps": 3, "optim.mask": str(tmp_path / "mask.safetensors"),
                                                    "optim.lr": 0.01})))
    p1 = restore_run_params(run)[1]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p0), jax.tree.leaves(p1)):
        name = jax.tree_util.keystr(path)
        if "w_up" in name:
            assert not np.array_equal(a, np.asarray(b)), name
        else:
            np.testing.assert_array_equal(a, np.asarray(b), err_msg=name)


def test_effopd_line_search_keeps_the_step_size_with_the_lowest_probe_divergence(tmp_path):
    """EffOPD as a line search (window 1, SGD): the update u is extrapolated to u + alpha * u for the alpha
    in (0, 0.5, 1, 2, 4) whose probe divergence is lowest. Checked from outside: the plain run gives u,
    the candidates p0 + (1 + alpha) u are scored on the same probe tokens, and the run ends at the best."""
    from flax import nnx

    from opd_jax.train import build_student, restore_run_params

    common = {"train.steps": 1, "train.checkpoint_every": 1, "optim.name": "sgd", "optim.lr": 0.5,
              "optim.momentum": 0.0, "train.eval_every": 100, **random_teacher(tmp_path)}
    train(load_config(None, tiny_overrides(tmp_path / "plain", **common)))
    searched = {**common, "optim.effopd_window": 1, "optim.effopd_line_search": "true",
                "optim.effopd_probe_per_domain": 2}
    cfg = load_config(None, tiny_overrides(tmp_path / "search", **searched))
    train(cfg)
    rec = json.loads((tmp_path / "search" / "metrics.jsonl").read_text().splitlines()[-1])
    best = rec["effopd/alpha"]
    p0 = nnx.to_pure_dict(nnx.state(build_student(cfg.student, cfg.train.seed)))
    plain, found = restore_run_params(tmp_path / "plain")[1], restore_run_params(tmp_path / "search")[1]
    cand = lambda a: jax.tree.map(lambda x, y: x + (1 + a) * (y - x), p0, plain)  # noqa: E731
    from opd_jax.guard import EffOPDGuard

    run = build_run(load_config(None, tiny_overrides(tmp_path / "probe", **searched)))
    probe = EffOPDGuard(run.rollouts, run.graphdef, run.spec, run.teacher_w, run.state_sh.params, run.cfg.optim,
                        run.init.key(), run.init.params)
    placed = lambda p: jax.device_put(p, run.state_sh.params)  # noqa: E731
    _, batch = probe.probe(placed(plain))  # the guard's probe tokens (its fixed key)
    from opd_jax.models import load_model

    tokens, full = (np.asarray(batch.tokens), np.concatenate([np.asarray(batch.prompt_mask),
                                                                 np.asarray(batch.mask)], 1))
    p, m = run.cfg.data.max_prompt_len, np.asarray(batch.mask, np.float64)
    teacher = load_model(tmp_path / "teacher")
    assert run.cfg.loss.kind == "reverse_kl" and run.cfg.data.temperature == 1.0

    def log_softmax(x):
        x = np.asarray(x, np.float64)[:, p - 1:-1]
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))

    lq = log_softmax(teacher(jnp.asarray(tokens), jnp.asarray(full)))

    def direct(params):  # KL(student || teacher) per completion token from two plain forwards, token mean
        ls = log_softmax(nnx.merge(run.graphdef, params)(jnp.asarray(tokens), jnp.asarray(full)))
        kl = (np.exp(ls) * (ls - lq)).sum(-1)
        return float((kl * m).sum() / m.sum())

    scores = {a: direct(jax.device_get(cand(a))) for a in (0.0, 0.5, 1.0, 2.0, 4.0)}
    for a, v in scores.items():
        assert rec[f"effopd/probe_alpha_{a:g}"] == pytest.approx(v, rel=1e-4, abs=1e-5)
    assert best == min(scores, key=scores.get) and len(set(np.round(list(scores.values()), 6))) == 5
    for x, y in zip(jax.tree.leaves(cand(best)), jax.tree.leaves(found)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_effopd_guard_rolls_back_jumps_that_raise_the_probe_divergence(tmp_path):
    """Absurd jumps (alpha up to 200 windows) must all be rolled back, leaving the plain run. (SGD: Adam
    would magnify the float rounding of p + a*d - a*d through its tiny second moments.)"""
    from opd_jax.train import restore_run_params

    common = {"train.steps": 4, "train.checkpoint_every": 4, "optim.name": "sgd", "optim.lr": 0.5,
              "train.eval_every": 100, **random_teacher(tmp_path)}
    train(load_config(None, tiny_overrides(tmp_path / "plain", **common)))
    guarded = {**common, "optim.effopd_window": 1, "optim.effopd_alpha_max": 200.0, "optim.effopd_min_cos": -1.0,
               "optim.effopd_guard": "true", "optim.effopd_probe_per_domain": 2}
    train(load_config(None, tiny_overrides(tmp_path / "guard", **guarded)))
    recs = [json.loads(x) for x in (tmp_path / "guard" / "metrics.jsonl").read_text().splitlines()]
    jumps = [r for r in recs if "effopd/rolled_back" in r]
    assert [r["step"] for r in jumps] == [2, 3, 4]
    assert all(r["effopd/rolled_back"] == 1.0 and r["effopd/probe_after"] > r["effopd/probe_before"] for r in jumps)
    a, b = restore_run_params(tmp_path / "plain")[1], restore_run_params(tmp_path / "guard")[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5)
    with pytest.raises(OpdError, match="effopd_window"):
        build_run(load_config(None, tiny_overrides(tmp_path / "bad", **{"optim.effopd_guard": "true"})))


def test_the_guard_follows_a_window_shifted_by_a_skipped_update(tmp_path, monkeypatch):
    """EffOPD window 2 with the guard: step 2's update is skipped (NaN teacher outputs), so the
    optimizer's windows close at steps 3 and 5, not 2 and 4 (the first window never jumps: it has no
    earlier direction); the guard must still judge the jump at step 5."""
    nan_teacher_at_step(monkeypatch, 2)
    out = tmp_path / "r"
    train(load_config(None, tiny_overrides(out, **{
        "train.steps": 5, "train.checkpoint_every": 5, "train.eval_every": 100, "optim.name": "sgd", "optim.lr": 0.5,
        "optim.effopd_window": 2, "optim.effopd_min_cos": -1.0, "optim.effopd_guard": "true",
        "optim.effopd_probe_per_domain": 2, **random_teacher(tmp_path)})))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in recs] == [0, 1, 0, 0, 0]
    assert [r["step"] for r in recs if "effopd/rolled_back" in r] == [5]
