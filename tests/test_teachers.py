"""Teacher scoring: each teacher runs once on exactly its routed rows and hands back what the
estimator needs, in the right rows; checked against plain whole-row forwards of the same models."""

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from opd_jax.layout import RowLayout
from opd_jax.models import ModelConfig, init_model
from opd_jax.teachers import Teacher, score_batch

from conftest import TINY

P, N, T = 5, 4, 0.7


def _teacher(name, seed, **shape):
    model = init_model(ModelConfig(**{**yaml.safe_load(TINY), **shape}), seed=seed)
    g, st = nnx.split(model)
    return Teacher(name, g, st, model.cfg.vocab_size, None, model.output_matrix()), model


@pytest.fixture(scope="module")
def setup():
    (ta, ma), (tb, mb) = _teacher("a", 1), _teacher("b", 2, hidden_size=48)
    rows = RowLayout.build(["x", "y", "z"], {"x": "a", "y": "b", "z": "a"}, per_domain=2, group_size=2, lam=1.0)
    B = rows.rows("on")  # 12 rows: x -> 0..3, y -> 4..7, z -> 8..11
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(3, 64, (B, P + N)), jnp.int32)
    pmask = np.ones((B, P), np.int32)
    pmask[::3, :2] = 0  # some left padding
    full = jnp.asarray(np.concatenate([pmask, np.ones((B, N), np.int32)], 1))
    return {"a": ta, "b": tb}, {"a": ma, "b": mb}, rows, tokens, full


def test_hidden_states_go_to_each_teacher_for_its_rows_only(setup, monkeypatch):
    import opd_jax.teachers as T_mod

    teachers, models, rows, tokens, full = setup
    groups = rows.groups(tokens.shape[0])
    assert groups == {"a": [0, 1, 2, 3, 8, 9, 10, 11], "b": [4, 5, 6, 7]}
    calls = []
    forward = T_mod.teacher_forward
    monkeypatch.setattr(T_mod, "teacher_forward", lambda t, tok, *a, **k: (calls.append(t.name), forward(t, tok, *a, **k))[1])
    out = score_batch(teachers, groups, tokens, full, prompt_len=P, temperature=T, what="hidden")
    assert sorted(calls) == ["a", "b"]  # each teacher once, on all its rows
    for name, idx in groups.items():
        want = models[name].completion_hidden(tokens[np.array(idx)], full[np.array(idx)], P)
        assert out[name].shape == (len(idx), N, models[name].cfg.hidden_size)
        np.testing.assert_allclose(np.asarray(out[name]), np.asarray(want), atol=1e-5)


def test_sampled_token_logprobs_come_back_in_batch_row_order(setup):
    teachers, models, rows, tokens, full = setup
    got = np.asarray(score_batch(teachers, rows.groups(tokens.shape[0]), tokens, full, prompt_len=P, temperature=T,
                                 what="logprobs"))
    for r in range(tokens.shape[0]):
        name = rows.routes[r // 4]
        logits = np.asarray(models[name](tokens[r:r + 1], attention_mask=full[r:r + 1]), np.float64)[0, P - 1:-1] / T
        lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        want = lp[np.arange(N), np.asarray(tokens[r, P:])]
        np.testing.assert_allclose(got[r], want, atol=2e-5, err_msg=f"row {r} ({name})")
