"""Update analysis on constructed updates with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import analysis as A
from opd_jax.models import ModelConfig, init_model


def test_rank_one_update_has_effective_rank_one_and_full_energy_at_k1():
    rng = np.random.RandomState(0)
    d = np.outer(rng.normal(size=40), rng.normal(size=30)).astype(np.float32)
    s = A.singular_values(jnp.asarray(d))
    assert float(A.effective_rank(s)) == pytest.approx(1.0, abs=1e-3)
    assert float(A.energy_fraction(s, 1)) == pytest.approx(1.0, abs=1e-5)
    assert int(A.numerical_rank(s, d.shape)) == 1
    full = rng.normal(size=(40, 30)).astype(np.float32)
    assert int(A.numerical_rank(A.singular_values(jnp.asarray(full)), full.shape)) == 30
    eq = np.eye(5, dtype=np.float32) * 3
    assert float(A.effective_rank(A.singular_values(jnp.asarray(eq)))) == pytest.approx(5.0, rel=1e-5)


def test_randomized_top_singular_matches_numpy():
    rng = np.random.RandomState(1)
    u, _ = np.linalg.qr(rng.normal(size=(120, 120)))
    v, _ = np.linalg.qr(rng.normal(size=(80, 80)))
    s = 2.0 ** -np.arange(80)
    m = (u[:, :80] * s) @ v.T
    _, got, _ = A.top_singular(jnp.asarray(m, jnp.float32), jax.random.key(0), 5)
    np.testing.assert_allclose(np.asarray(got), s[:5], rtol=1e-4)


def test_subspace_overlap_one_for_same_zero_for_orthogonal():
    q, _ = np.linalg.qr(np.random.RandomState(2).normal(size=(20, 20)))
    a, b = jnp.asarray(q[:, :4]), jnp.asarray(q[:, 4:8])
    assert float(A.subspace_overlap(a, a)) == pytest.approx(1.0, abs=1e-6)
    assert float(A.subspace_overlap(a, b)) == pytest.approx(0.0, abs=1e-6)
    rot = a @ jnp.asarray(np.linalg.qr(np.random.RandomState(3).normal(size=(4, 4)))[0])
    assert float(A.subspace_overlap(a, rot)) == pytest.approx(1.0, abs=1e-5)  # same span, other basis


def test_sparsity_counts_and_bfloat16_rounding_tolerance():
    w0 = jnp.asarray(np.linspace(0.5, 2.0, 100), jnp.float32)
    w1 = w0.at[:7].add(0.1)
    assert int(jnp.sum(A.changed(w0, w1))) == 7
    b0 = w0.astype(jnp.bfloat16)
    b1 = (b0.astype(jnp.float32) * (1 + 2.0 ** -9)).astype(jnp.bfloat16)  # below one bf16 step: rounds back
    assert int(jnp.sum(A.changed(b0, b1, "bfloat16"))) == 0


def test_near_zero_preference_is_one_for_uniform_random_masks_and_high_when_small_weights_move():
    rng = np.random.RandomState(4)
    w0 = rng.normal(size=200_000)
    uniform = rng.uniform(size=w0.size) < 0.1
    assert A.near_zero_preference(w0, uniform) == pytest.approx(1.0, abs=0.05)
    small_first = np.abs(w0) < np.quantile(np.abs(w0), 0.1)
    assert A.near_zero_preference(w0, small_first) == pytest.approx(10.0, rel=1e-3)


def test_analyze_update_groups_by_module_and_layer():
    model = init_model(ModelConfig.for_family("qwen3", num_layers=3), seed=0)
    p0 = nnx.to_pure_dict(nnx.state(model))
    p1 = jax.tree.map(lambda x: x, p0)
    p1["layers"]["w_up"] = p0["layers"]["w_up"].at[1].multiply(1.5)  # only layer 1's MLP up moves, by 50%
    rep = A.analyze_update(p0, p1, k=4)
    norms = np.linalg.norm(np.asarray(p0["layers"]["w_up"]).reshape(3, -1), axis=1)
    assert rep["relative_movement_by_module"]["mlp_up"] == pytest.approx(0.5 * norms[1] / np.linalg.norm(norms), rel=1e-4)
    assert rep["relative_movement_by_module"]["attn_q"] == 0.0
    assert rep["relative_movement_by_layer"][1]["mlp_up"] == pytest.approx(0.5, rel=1e-4)
    assert rep["relative_movement_by_layer"][0]["mlp_up"] == 0.0
    n_up = p0["layers"]["w_up"][1].size
    total = sum(x.size for x in jax.tree.leaves(p0))
    assert rep["sparsity"] == pytest.approx(1 - n_up / total, abs=1e-9)
    up1 = next(m for m in rep["matrices"] if m["name"] == "w_up" and m["layer"] == 1)
    assert up1["overlap_with_w0"] == pytest.approx(1.0, abs=1e-4)  # dW = 0.5 W0 lies in W0's subspace
    # rank and energy come from every singular value of dW = 0.5 W0 (numpy's SVD of W0 as the reference)
    w = np.asarray(p0["layers"]["w_up"][1], np.float64)
    sv = np.linalg.svd(w, compute_uv=False)
    assert up1["numerical_rank"] == np.linalg.matrix_rank(w) == min(w.shape)
    assert up1["energy_top_k"] == pytest.approx((sv[:4] ** 2).sum() / (sv ** 2).sum(), rel=1e-4)
    # a move of 1e-3 relative: a change in float32, below bfloat16's rounding step (2^-8)
    p2 = jax.tree.map(lambda x: x, p0)
    p2["layers"]["w_down"] = p0["layers"]["w_down"].at[0].multiply(1 + 1e-3)
    rep2 = A.analyze_update(p0, p2, k=4)
    n_down = int((np.asarray(p0["layers"]["w_down"][0]) != 0).sum())
    assert rep2["sparsity"] == pytest.approx(1 - n_down / total, abs=1e-9) and rep2["sparsity_bfloat16"] == 1.0


def test_analyze_cli_on_real_checkpoints(tmp_path):
    from opd_jax.cli import main
    from opd_jax.config import load_config
    from opd_jax.train import train
    from conftest import tiny_overrides

    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(run, **{"train.steps": 4, "train.checkpoint_every": 1,
                                                    "train.keep_checkpoints": 10, "optim.lr": 0.01})))
    out = tmp_path / "an"
    assert main(["analyze", "--before", str(run / "checkpoints" / "1"), "--after", str(run), "--series", str(run),
                 "--out", str(out), "--k", "2"]) == 0
    import json
    rep = json.loads((out / "analysis.json").read_text())
    assert 0.0 <= rep["sparsity"] < 1.0 and rep["relative_movement_by_module"]["mlp_up"] > 0
    assert [a["step"] for a in rep["alignment"]] == [1, 2, 3, 4]
    assert rep["alignment"][-1]["alignment"] == pytest.approx(1.0, abs=1e-4)
    assert {"movement_heatmap.png", "spectra.png", "alignment.png"} <= {p.name for p in out.iterdir()}


def test_alignment_series_matches_hand_computed_overlaps():
    """Only layer 0's w_up moves. The final update spans {e0, e1}; the snapshot at t=1 spans {e0, cos a e1 +
    sin a e2}, at t=2 {e2, e3}, so with k=2 the overlaps ||U_t^T U_T||_F^2 / 2 are (1 + cos^2 a) / 2, 0 and 1."""
    model = init_model(ModelConfig.for_family("qwen3", num_layers=2), seed=0)
    p0 = nnx.to_pure_dict(nnx.state(model))
    d, f = p0["layers"]["w_up"].shape[1:]
    rng = np.random.RandomState(5)
    e = np.eye(d)
    a = np.pi / 3

    def moved(cols, scales):
        delta = sum(s * np.outer(c, rng.normal(size=f)) for c, s in zip(cols, scales))
        p = jax.tree.map(lambda x: x, p0)
        p["layers"]["w_up"] = p0["layers"]["w_up"].at[0].add(jnp.asarray(delta, jnp.float32))
        return p

    snaps = [p0, moved([e[0], np.cos(a) * e[1] + np.sin(a) * e[2]], [3.0, 1.0]), moved([e[2], e[3]], [2.0, 1.0]),
             moved([e[0], e[1]], [2.0, 1.0])]
    series = A.alignment_series(snaps, k=2)
    assert [s["index"] for s in series] == [1, 2, 3]
    assert series[0]["alignment"] == pytest.approx((1 + np.cos(a) ** 2) / 2, abs=1e-4)  # 0.625
    assert series[1]["alignment"] == pytest.approx(0.0, abs=1e-4)
    assert series[2]["alignment"] == pytest.approx(1.0, abs=1e-4)
