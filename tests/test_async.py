"""Asynchronous OPD (train.max_staleness): persistent slots with a version on every token, the
sampler thread's schedule, dropped stale sequences, truncated importance weights, and k = 0 being
the synchronous loop exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax.config import load_config
from opd_jax.engine import Engine, EngineSpec
from opd_jax.hooks import Logger, SkipCounter
from opd_jax.losses.sampled import importance_weights, sampled_surrogate
from opd_jax.models import ModelConfig, init_model
from opd_jax.pipeline import Pipeline
from opd_jax.rollouts import staleness
from opd_jax.run import build_run
from opd_jax.stream import Stream
from opd_jax.train import train_loop

from conftest import host, random_teacher, rigged_model, tiny_overrides


def _params(model):
    return nnx.to_pure_dict(nnx.split(model)[1])


def test_version_tags_name_the_weights_that_drew_each_token():
    """Rigged weights reveal themselves: version 0 always continues with token 10, version 1 with 20.
    The stream switches weights while batch 0 is half way and batch 1 queues behind it; every token's
    tag must name the weights its token says drew it (the first token after a switch comes from the
    logits the old weights left in the slot)."""
    v0 = rigged_model({t: 10 for t in range(64)})
    v1 = rigged_model({t: 20 for t in range(64)})
    graphdef = nnx.split(v0)[0]
    spec = EngineSpec(prompt_len=4, max_new_tokens=6, slots=3, temperature=0.0, steps_per_call=2)
    stream = Stream(Engine(graphdef, v0.cfg, spec), group=2)
    ids, pmask = np.full((2, 4), 5, np.int32), np.ones((2, 4), np.int32)
    stream.set_params(_params(v0), 0)
    stream.add(0, ids, pmask, jax.random.key(0))
    stream.advance()
    stream.advance()  # 3 sequences 4 tokens in; the fourth waits
    stream.set_params(_params(v1), 1)
    stream.add(1, ids, pmask, jax.random.key(1))
    done = []
    while stream.live or stream.queue:
        done += stream.advance()
    assert done == [0, 1]
    for b in (0, 1):
        roll, versions, _ = stream.take(b)
        tok = np.asarray(roll.tokens)[:, 4:]
        assert set(np.unique(tok)) <= {10, 20}
        np.testing.assert_array_equal(versions, np.where(tok == 10, 0, 1))
    # batch 0 mixes versions inside a sequence (a partial rollout continued under new weights)
    assert stream.stats.generated == 48


def test_a_stream_with_fixed_weights_reproduces_the_synchronous_tokens():
    """Batches sharing slots (batch 1 starts in slots batch 0 frees) give every sequence the tokens and
    log-probs of a separate `Engine.run` with that batch's key."""
    model = init_model(ModelConfig.for_family("qwen3", vocab_size=64, num_heads=4, num_kv_heads=2), seed=3)
    graphdef, params = nnx.split(model)[0], _params(model)
    spec = EngineSpec(prompt_len=5, max_new_tokens=7, slots=3, temperature=0.9, top_k=30, stop=(3, 7, 11),
                      steps_per_call=3)
    rng = np.random.RandomState(0)
    prompts = [(rng.randint(4, 64, (3, 5)).astype(np.int32), np.ones((3, 5), np.int32)) for _ in range(2)]
    stream = Stream(Engine(graphdef, model.cfg, spec), group=2)
    stream.set_params(params, 0)
    for b, (ids, pm) in enumerate(prompts):
        stream.add(b, ids, pm, jax.random.key(40 + b))
    while stream.live or stream.queue:
        stream.advance()
    whole = EngineSpec(**{**spec.__dict__, "slots": 6})
    for b, (ids, pm) in enumerate(prompts):
        roll, versions, _ = stream.take(b)
        ref, _ = Engine(graphdef, model.cfg, whole).run(params, ids, pm, jax.random.key(40 + b), group=2)
        for x, y in zip(roll[:3], ref[:3]):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
        assert (versions[np.asarray(roll.mask) == 1] == 0).all()


def test_staleness_counts_from_the_oldest_real_token():
    versions = np.array([[3, 4, 5, -1], [5, 5, -1, -1], [-1, -1, -1, -1]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(staleness(versions, mask, 6), [3, 1, 0])


def test_truncated_importance_weights_equal_a_numpy_reference():
    """iw = min(pi / mu, cap); the stale surrogate max(w rho~, w clip(rho~, 1-eps, 1+eps)) with rho~ the
    ratio truncated at the cap has, per token, the gradient in log pi that numpy gives by cases:
    w min(rho, cap) where the first branch is the larger, w rho inside the clip band otherwise, else 0
    (w = -log(q / pi), the stop-gradient reverse-KL weight; divided by the token count)."""
    rng = np.random.RandomState(0)
    s, t = (rng.uniform(-3, -0.1, (4, 6)).astype(np.float32) for _ in range(2))
    mu = (s - rng.uniform(-1.5, 1.7, (4, 6))).astype(np.float32)  # ratios from 0.2 to 5.5: every case
    mask = (rng.rand(4, 6) > 0.2).astype(np.int32)
    cap, eps = 2.0, 0.2
    iw, m = importance_weights(jnp.asarray(s), jnp.asarray(mu), jnp.asarray(mask), cap)
    rho = np.exp(s.astype(np.float64) - mu)
    ref = np.where(mask > 0, np.minimum(rho, cap), 0.0)
    np.testing.assert_allclose(np.asarray(iw), ref, rtol=1e-5)
    np.testing.assert_allclose(float(m["is_clip_fraction"]), ((rho > cap) & (mask > 0)).sum() / mask.sum(), rtol=1e-6)

    def loss(slp):
        return sampled_surrogate(slp, jnp.asarray(t), jnp.asarray(mask), "reverse_kl", estimator="stop_grad",
                                 sampler_logprobs=jnp.asarray(mu), is_cap=cap, clip_eps=eps)[0]

    grad = np.asarray(jax.grad(loss)(jnp.asarray(s)))
    w = -(t - s).astype(np.float64)
    first, second = w * np.minimum(rho, cap), w * np.clip(rho, 1 - eps, 1 + eps)
    inside = (rho > 1 - eps) & (rho < 1 + eps)
    g = np.where(first >= second, w * np.minimum(rho, cap), np.where(inside, w * rho, 0.0))
    expect = np.where(mask > 0, g / mask.sum(), 0.0)
    np.testing.assert_allclose(grad, expect, rtol=1e-4, atol=1e-7)
    assert float(m["is_clip_fraction"]) > 0 and (expect == 0).sum() > (mask == 0).sum()  # both cuts happen


def _cfg(tmp_path, name, **extra):
    over = {"loss.estimator_type": "sampled", "loss.kind": "reverse_kl", "data.rollout_slots": 5,
            "train.eval_every": 100, **random_teacher(tmp_path), **extra}
    return load_config(None, tiny_overrides(tmp_path / name, **over))


class _Record:
    def __init__(self):
        self.batches, self.records = [], []

    def after_step(self, ctx):
        self.batches.append(ctx.batch)
        self.records.append(dict(ctx.record))


def _steps(run, n, hooks=()):
    rec = _Record()
    state = train_loop(run, run.init, [SkipCounter(3), Logger(run), *hooks, rec], start=0, end=n)
    return state, rec


def test_max_staleness_0_is_the_synchronous_loop_bit_for_bit(tmp_path):
    """k = 0 (the default) takes no importance weights and no sampler thread: its parameters after 3
    steps equal a hand-written sample -> score -> update loop's exactly."""
    run = build_run(_cfg(tmp_path, "a", **{"train.max_staleness": 0}))
    assert run.spec.is_cap == 0.0
    state, _ = _steps(run, 3)
    ref_run = build_run(_cfg(tmp_path, "b"))
    ref = ref_run.init
    for step in range(3):
        batch = ref_run.rollouts.collect(step, ref)
        ref, _ = ref_run.update(ref, batch.arrays, ref_run.teacher_w)
    jax.tree.map(np.testing.assert_array_equal, host(state.params), host(ref.params))


def test_one_step_stale_pipeline_tags_weights_and_drops_nothing(tmp_path):
    """k = 1: batch 0 comes from version 0, every later batch from the version one update behind; the
    importance weights are on (is_cap 2) and no sequence is dropped."""
    run = build_run(_cfg(tmp_path, "c", **{"train.max_staleness": 1, "train.steps": 4}))
    assert run.spec.is_cap == 2.0
    _, rec = _steps(run, 4)
    for step, batch in enumerate(rec.batches):
        m = np.asarray(batch.arrays["on"].mask)
        assert (batch.versions[m == 1] == max(0, step - 1)).all()
        r = rec.records[step]
        assert r["rollout/dropped"] == 0 and r["rollout/staleness_%d" % min(step, 1)] == m.shape[0]
        assert "on_policy/is_clip_fraction" in r and "time/weight_sync" in r
    # overlap, from the pipeline's timestamps (sampler thread and learner in one process): rollout t+1
    # starts before update t has finished (its weights published), and update t starts (batch t taken)
    # before rollout t+1 is ready: the update never waits for the next rollout
    at = {(e, i): t for e, i, t in rec.batches[-1].timeline}
    assert [i for e, i, _ in rec.batches[-1].timeline if e == "published"] == [0, 1, 2, 3, 4]  # a sync per update
    for t in range(1, 3):
        assert at[("started", t + 1)] < at[("published", t + 1)]
        assert at[("taken", t)] < at[("ready", t + 1)]


def test_both_paths_build_batches_with_one_function_and_log_the_same_rollout_keys(tmp_path, monkeypatch):
    """k = 0 (collect) and k = 1 (the pipeline's sampler thread) both build every batch with
    `Rollouts.finish`, and log the same per-step rollout keys (the staleness histogram's buckets, one
    per staleness up to k, aside). The asynchronous decode steps are the stream's per batch: they add
    up to its lifetime count."""
    import re

    from opd_jax.rollouts import Rollouts

    calls, pipes, real, init = [], [], Rollouts.finish, Pipeline.__init__
    monkeypatch.setattr(Rollouts, "finish", lambda self, step, *a, **kw: calls.append(step) or real(self, step, *a, **kw))
    monkeypatch.setattr(Pipeline, "__init__", lambda self, *a, **kw: pipes.append(self) or init(self, *a, **kw))
    keys = {}
    for k in (0, 1):
        calls.clear()
        _, rec = _steps(build_run(_cfg(tmp_path, f"p{k}", **{"train.max_staleness": k, "train.steps": 3})), 3)
        assert sorted(calls) == [0, 1, 2]
        keys[k] = [sorted(x for x in r if x.startswith("rollout/") and not re.fullmatch(r"rollout/staleness_\d+(plus)?", x))
                   for r in rec.records]
        steps = [r["rollout/decode_steps"] for r in rec.records]
    assert keys[0] == keys[1] and {"rollout/occupancy", "rollout/decode_steps", "rollout/dropped"} <= set(keys[0][0])
    assert len(pipes) == 1 and sum(steps) == pipes[0].stream.stats.decode_steps and min(steps) > 0


def test_sequences_older_than_k_are_dropped(tmp_path, monkeypatch):
    """A sampler rigged to lag one version more than allowed: from step 2 on every sequence is two
    versions old, so all are dropped (mask zeroed, counted) and the update sees no token."""
    monkeypatch.setattr(Pipeline, "sampler_version", lambda self, b: max(self.start, b - self.k - 1))
    run = build_run(_cfg(tmp_path, "d", **{"train.max_staleness": 1, "train.steps": 3}))
    _, rec = _steps(run, 3)
    rows = rec.batches[0].arrays["on"].mask.shape[0]
    assert [r["rollout/dropped"] for r in rec.records] == [0, 0, rows]
    assert rec.records[2]["on_policy/tokens"] == 0 and rec.records[1]["on_policy/tokens"] > 0
    assert int(np.asarray(rec.batches[2].arrays["on"].mask).sum()) == 0


def test_one_step_stale_training_reaches_the_synchronous_divergence(tmp_path):
    """Exact forward KL against a random tiny teacher, 12 seeded steps: the asynchronous run (k = 1)
    ends within 5% of the synchronous run's teacher divergence (mean of the last 4 steps)."""
    out = {}
    for k in (0, 1):
        cfg = _cfg(tmp_path, f"q{k}", **{"loss.estimator_type": "full", "loss.kind": "forward_kl",
                                        "train.max_staleness": k, "train.steps": 12, "optim.lr": 3e-3})
        _, rec = _steps(build_run(cfg), 12)
        div = [r["on_policy/divergence"] for r in rec.records]
        assert div[-1] < 0.8 * div[0]  # it learns
        out[k] = np.mean(div[-4:])
    assert abs(out[1] - out[0]) <= 0.05 * out[0], out


def test_a_packed_asynchronous_run_equals_the_padded_one_drops_included(tmp_path, monkeypatch):
    """k = 1 with data.pack_tokens: the sampler's log-probs (importance weights) move with their tokens and
    a dropped sequence is left out of the rows. With the sampler rigged to lag one version too many from
    step 2 (every sequence dropped there), the packed run logs the padded run's losses, importance weights
    and drops, and ends at its parameters."""
    monkeypatch.setattr(Pipeline, "sampler_version", lambda self, b: max(self.start, b - self.k - (b >= 3)))
    out = {}
    for name, extra in (("pad", {}), ("pack", {"data.pack_tokens": 64})):
        run = build_run(_cfg(tmp_path, name, **{"train.max_staleness": 1, "train.steps": 4, **extra}))
        state, rec = _steps(run, 4)
        out[name] = host(state.params), rec
    (p0, r0), (p1, r1) = out["pad"], out["pack"]
    assert all(p.packed for b in r1.batches for p in b.arrays.values())
    rows = r0.batches[0].arrays["on"].mask.shape[0]
    assert [r["rollout/dropped"] for r in r1.records] == [r["rollout/dropped"] for r in r0.records] == [0, 0, 0, rows]
    for a, b in zip(r0.records, r1.records):
        for k in ("loss", "on_policy/tokens", "on_policy/is_weight", "on_policy/is_clip_fraction"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p0)
