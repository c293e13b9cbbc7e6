"""The EffOPD guard and line search (`opd_jax.guard`): probe divergences from direct forwards, rollbacks, the
line search's choice, and the window after a skipped update; EffOPD and sparse masks from the config."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import OpdError
from opd_jax.config import load_config
from opd_jax.run import build_run
from opd_jax.train import train

from conftest import random_teacher, tiny_overrides

from test_train import nan_teacher_at_step


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
