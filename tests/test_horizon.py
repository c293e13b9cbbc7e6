"""Rollout-horizon control (data.horizon): the cut step equals a full-length step with a prefix mask,
decoding stops at the horizon, one update program per length bucket (at most 8), one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax.batch import Part
from opd_jax.config import LossConfig, load_config
from opd_jax.errors import OpdError
from opd_jax.horizon import buckets, horizon_tokens
from opd_jax.models import ModelConfig, init_model
from opd_jax.run import build_run
from opd_jax.train_step import TRACES, StepSpec, part_value_and_grad

from conftest import random_teacher, tiny_overrides


def test_horizon_lengths_are_at_most_8_buckets():
    assert buckets(8) == (1, 2, 3, 4, 5, 6, 7, 8)
    assert buckets(100) == (13, 25, 38, 50, 63, 75, 88, 100)
    assert buckets(3) == (1, 2, 3)
    cfg = load_config(None, ["data.max_new_tokens=100", "data.horizon=0.1"])
    assert horizon_tokens(cfg.data, 0, 50) == 13  # 10 tokens, rounded up to a bucket
    lin = load_config(None, ["data.max_new_tokens=100", "data.horizon=0.25", "data.horizon_schedule=linear"])
    assert [horizon_tokens(lin.data, s, 5) for s in range(5)] == [25, 50, 63, 88, 100]  # 25, 43.75, 62.5, 81.25, 100


@pytest.mark.parametrize("lc", [LossConfig(estimator_type="full", kind="forward_kl"),
                                LossConfig(estimator_type="sampled", kind="reverse_kl", level="sequence")],
                         ids=["full", "sampled-sequence"])
def test_the_cut_step_equals_a_full_length_step_with_a_prefix_mask(lc):
    """Loss and gradient of rows cut to their first h = 3 new tokens equal those of the whole rows
    (N = 7) with the mask zeroed from h on: later positions never reach earlier ones."""
    model = init_model(ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                   num_kv_heads=1, head_dim=16, max_position_embeddings=32), seed=4)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    rng = np.random.RandomState(1)
    B, P, N, h = 4, 5, 7, 3
    tokens = jnp.asarray(rng.randint(3, 48, (B, P + N)), jnp.int32)
    pmask = jnp.ones((B, P), jnp.int32)
    mask = jnp.asarray(np.arange(N)[None] < rng.randint(2, N + 1, (B, 1)), jnp.int32)
    teacher = (jnp.asarray(rng.randn(B, N, 48), jnp.float32) if lc.estimator_type == "full"
               else jnp.asarray(-rng.rand(B, N) * 3, jnp.float32))
    slp = jnp.asarray(-rng.rand(B, N), jnp.float32)
    spec = StepSpec(lc, prompt_len=P, group_size=1, temperature=1.0)
    full = Part(tokens, pmask, mask * (jnp.arange(N)[None] < h), teacher, slp, jnp.zeros(B))
    cut = Part(tokens[:, :P + h], pmask, mask[:, :h], teacher[:, :h], slp[:, :h], jnp.zeros(B))
    step = jax.jit(lambda p, b: part_value_and_grad(graphdef, p, b, spec))
    (l_full, _), g_full = step(params, full)
    (l_cut, _), g_cut = step(params, cut)
    np.testing.assert_allclose(float(l_cut), float(l_full), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_cut, g_full)


def test_decoding_stops_at_the_horizon_and_each_length_compiles_once(tmp_path):
    """N = 8 with a linear horizon from 1/8 over 3 steps: each step samples, scores and trains on its
    h new tokens (the logged horizon and decode steps), and the update is compiled once per distinct
    h below N (counted), never more than the 8 buckets."""
    cfg = load_config(None, tiny_overrides(tmp_path / "r", **{
        "data.max_new_tokens": 8, "data.horizon": 0.125, "data.horizon_schedule": "linear", "train.steps": 3,
        "loss.estimator_type": "sampled", "train.eval_every": 100}))
    run = build_run(cfg)
    before = TRACES["update"]
    hs = [horizon_tokens(cfg.data, s, 3) for s in range(3)]
    assert hs == [1, 5, 8]  # 1, 4.5, 8
    records = []

    class Keep:
        def after_step(self, ctx):
            records.append(dict(ctx.record))
            assert ctx.batch.arrays["on"].mask.shape[1] == hs[ctx.step]

    from opd_jax.hooks import Logger
    from opd_jax.train import train_loop
    train_loop(run, run.init, [Logger(run), Keep()], start=0, end=3)
    assert [r["rollout/horizon"] for r in records] == hs
    assert all(r["rollout/decode_steps"] <= h for r, h in zip(records, hs))
    assert TRACES["update"] - before == len(set(hs) - {8})
    P = run.cfg.data.max_prompt_len  # one program per on-policy length (keyed by the parts' shapes)
    assert {dict(k)["on"][1] - P for k in run.update.programs} == set(hs)


@pytest.mark.parametrize("extra, message", [
    ({"data.horizon": 0}, "data.horizon must be a fraction in \\(0, 1\\]"),
    ({"data.horizon": 2.5}, "data.horizon must be a fraction"),
    ({"data.horizon": 40}, "data.horizon 40 exceeds data.max_new_tokens 6"),
    ({"data.horizon_schedule": "cosine"}, "data.horizon_schedule must be one of"),
    ({"data.horizon": 0.5, "loss.rl_alpha": 0.5, "loss.estimator_type": "sampled"},
     "cuts answers before they end, so verifier rewards"),
])
def test_bad_horizons_are_one_line_errors(tmp_path, extra, message):
    with pytest.raises(OpdError, match=message):
        build_run(load_config(None, tiny_overrides(tmp_path / "x", **extra)))
    assert not (tmp_path / "x").exists()


def _popd_lengths(levels, start, window, divergences):
    """The progressive rule written out again: the length each step trained at, given the steps'
    divergences (grow one level once 2w steps at a length end with a window mean not below the one before)."""
    lvl, hist, out = levels.index(start), [], []
    for d in divergences:
        out.append(levels[lvl])
        hist.append(d)
        if lvl + 1 < len(levels) and len(hist) >= 2 * window and np.mean(hist[-window:]) >= np.mean(hist[-2 * window:-window]):
            lvl, hist = lvl + 1, []
    return out


def test_progressive_rule_on_a_given_divergence_sequence():
    from opd_jax.horizon import ProgressiveHorizon

    cfg = load_config(None, ["data.max_new_tokens=16", "data.horizon=0.25", "data.horizon_schedule=progressive",
                             "data.horizon_window=2"])
    ctl = ProgressiveHorizon(cfg.data)
    ds = [5, 4, 3, 2, 2.5, 2.4, 9, 8, 7, 7.5, 7, 8, 1, 1, 1, 1, 1, 1, 1, 1]
    seen, state = [], ctl.initial()
    for d in ds:
        seen.append(ctl.h(state))
        state = ctl.observe(state, d)
    # by hand (buckets 2, 4, ..., 16; start 4; w = 2): the window means fall until step 7 ((2.4, 9) = 5.7 >=
    # (2, 2.5) = 2.25) -> 6; at 6: (7.5, 7) < (8, 7), then (7, 8) = 7.5 >= (7, 7.5) = 7.25 -> 8 from step 13;
    # at 8: four 1s, equal windows -> 10 from step 17
    assert seen == [4] * 7 + [6] * 5 + [8] * 4 + [10] * 4
    assert seen == _popd_lengths(list(buckets(16)), 4, 2, ds)


def test_progressive_horizon_trains_by_the_rule_and_resumes_its_state(tmp_path):
    """The trainer follows the rule on its own logged divergences; a run stopped after 2 steps resumes the
    schedule from its checkpoint alone (horizon.jsonl, the trace, is deleted before the resume). SGD at
    learning rate 20 makes the divergence rise at step 3, so the horizon grows after it, a decision that
    needs steps 1-2's divergences from before the resume."""
    import json

    from opd_jax.train import train

    over = {"data.max_new_tokens": 8, "data.horizon": 0.25, "data.horizon_schedule": "progressive",
            "data.horizon_window": 1, "train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 100,
            "optim.name": "sgd", "optim.lr": 20.0,
            **random_teacher(tmp_path)}
    cfg = load_config(None, tiny_overrides(tmp_path / "r", **over))
    train(cfg, stop_after=2)
    first = (tmp_path / "r" / "horizon.jsonl").read_text()
    (tmp_path / "r" / "horizon.jsonl").unlink()  # the checkpoint alone carries the schedule's state
    train(cfg, resume=True)
    trace = [json.loads(x) for x in (first + (tmp_path / "r" / "horizon.jsonl").read_text()).splitlines()]
    assert [t["step"] for t in trace] == [1, 2, 3, 4]
    assert [t["h"] for t in trace] == _popd_lengths(list(buckets(8)), 2, 1, [t["divergence"] for t in trace])
    assert trace[-1]["h"] > 2  # it grew (after the resume: from the replayed trace)
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/horizon"] for r in recs] == [t["h"] for t in trace]
