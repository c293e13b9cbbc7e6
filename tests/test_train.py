"""The trainer end to end on a tiny config: every loss mode, routing, errors, checkpoints, export, resume."""

import dataclasses
import json

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
