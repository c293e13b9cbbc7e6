"""EffOPD and sparse masks: known answers on small problems, state round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from opd_jax.optim import (effopd, jumped, load_mask, mask_density, mask_from_patterns, mask_from_small_weights,
                           mask_from_update, masked_optimizer, random_mask, save_mask)

TARGET = {"a": jnp.asarray([3.0, -2.0, 1.0]), "b": jnp.asarray([[0.5, 4.0]])}


def quad_grad(p):
    return jax.grad(lambda q: sum(jnp.sum((q[k] - TARGET[k]) ** 2) for k in q))(p)


def steps_to_reach(opt, tol=0.05, max_steps=2000):
    p = jax.tree.map(jnp.zeros_like, TARGET)
    state = opt.init(p)
    update = jax.jit(opt.update)
    for t in range(1, max_steps + 1):
        u, state = update(quad_grad(p), state, p)
        p = optax.apply_updates(p, u)
        err = float(jnp.sqrt(sum(jnp.sum((p[k] - TARGET[k]) ** 2) for k in p)))
        if err < tol:
            return t
    return max_steps + 1


def test_effopd_reaches_a_quadratic_target_in_fewer_steps():
    base = steps_to_reach(optax.sgd(0.01))
    fast = steps_to_reach(effopd(optax.sgd(0.01), window=5, alpha_max=3.0))
    assert fast < 0.6 * base, (fast, base)
    adam_base = steps_to_reach(optax.adam(0.02))
    adam_fast = steps_to_reach(effopd(optax.adam(0.02), window=5, alpha_max=2.0))
    assert adam_fast < adam_base, (adam_fast, adam_base)


def test_effopd_does_nothing_when_consecutive_windows_disagree():
    """Gradients whose sign flips every window: the window directions are opposite, alpha = 0, and the
    updates equal the inner optimizer's exactly."""
    inner = optax.sgd(0.1)
    opt = effopd(inner, window=3, alpha_max=5.0)
    p = {"w": jnp.ones((4,))}
    s_in, s_eff = inner.init(p), opt.init(p)
    for t in range(18):
        g = {"w": jnp.full((4,), 1.0 if (t // 3) % 2 == 0 else -1.0)}
        u_in, s_in = inner.update(g, s_in, p)
        u_eff, s_eff = opt.update(g, s_eff, p)
        np.testing.assert_array_equal(u_eff["w"], u_in["w"])
        if t >= 5 and (t + 1) % 3 == 0:
            assert float(s_eff.cosine) == pytest.approx(-1.0) and float(s_eff.alpha) == 0.0


def test_effopd_jump_is_alpha_times_the_window_direction():
    opt = effopd(optax.sgd(1.0), window=2, alpha_max=1.5)
    p = {"w": jnp.zeros((2,))}
    s = opt.init(p)
    g = {"w": jnp.asarray([1.0, 2.0])}
    outs = []
    for _ in range(4):
        u, s = opt.update(g, s, p)
        outs.append(np.asarray(u["w"]))
    d = np.array([-2.0, -4.0])  # two SGD steps of -g
    np.testing.assert_allclose(outs[1], -np.array([1.0, 2.0]))  # first window: nothing to compare with
    np.testing.assert_allclose(outs[3], -np.array([1.0, 2.0]) + 1.5 * d)  # cos = 1 -> alpha_max
    assert bool(jumped(s)) and float(s.alpha) == pytest.approx(1.5)


def test_effopd_state_round_trips_through_orbax(tmp_path):
    opt = effopd(optax.adamw(1e-2), window=3)
    p = {"w": jnp.arange(6.0).reshape(2, 3)}
    s = opt.init(p)
    for t in range(4):
        _, s = opt.update({"w": jnp.ones((2, 3)) * (t + 1)}, s, p)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "s", s)
    ckpt.wait_until_finished()
    back = ckpt.restore(tmp_path / "s", jax.tree.map(ocp.utils.to_shape_dtype_struct, s))
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the restored state continues identically
    g = {"w": jnp.full((2, 3), 0.3)}
    np.testing.assert_array_equal(opt.update(g, s, p)[0]["w"], opt.update(g, back, p)[0]["w"])


def test_masked_coordinates_stay_bit_identical_and_frozen_leaves_have_no_state():
    rng = np.random.RandomState(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32), "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
              "frozen": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)}
    mask = {"w": jnp.asarray(rng.uniform(size=(8, 8)) < 0.2), "b": jnp.ones((8,), bool), "frozen": jnp.zeros((3, 3), bool)}
    opt = masked_optimizer(optax.adamw(0.05, weight_decay=0.1), mask)
    state = opt.init(params)
    leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "shape") and x.ndim == 2]
    assert all(x.shape == (8, 8) for x in leaves) and leaves  # no Adam moments for the frozen leaf
    p = params
    for t in range(50):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
        u, state = opt.update(g, state, p)
        p = optax.apply_updates(p, u)
    w0, w1 = np.asarray(params["w"]), np.asarray(p["w"])
    m = np.asarray(mask["w"])
    np.testing.assert_array_equal(w1[~m].view(np.uint32), w0[~m].view(np.uint32))
    assert (w1[m] != w0[m]).all()
    np.testing.assert_array_equal(np.asarray(p["frozen"]), np.asarray(params["frozen"]))


def test_mask_builders_have_known_counts(tmp_path):
    delta = {"a": jnp.asarray([[0.0, 5.0], [1.0, -3.0]]), "b": jnp.asarray([0.5, -4.0, 2.0, 0.1])}
    g = mask_from_update(delta, 0.375)  # top 3 of 8 by |delta|: 5, -4, -3
    assert np.asarray(g["a"]).tolist() == [[False, True], [False, True]] and np.asarray(g["b"]).tolist() == [False, True, False, False]
    pm = mask_from_update(delta, 0.5, scope="per_matrix")
    assert np.asarray(pm["a"]).sum() == 2 and np.asarray(pm["b"]).sum() == 2
    small = mask_from_small_weights(delta, 0.25)
    assert np.asarray(small["b"]).tolist() == [False, False, False, True] and np.asarray(small["a"])[0, 0]
    pat = mask_from_patterns({"layers": {"w_up": jnp.ones((2, 2)), "wq": jnp.ones((2,))}}, ["w_up|w_down"])
    assert np.asarray(pat["layers"]["w_up"]).all() and not np.asarray(pat["layers"]["wq"]).any()
    r = random_mask({"x": jnp.zeros((200, 100))}, 0.1, seed=1)
    assert abs(mask_density(r) - 0.1) < 0.01
    save_mask(g, tmp_path / "m.safetensors")
    back = load_mask(tmp_path / "m.safetensors", delta)
    for k in g:
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(g[k]))


def test_undo_jump_recovers_the_plain_masked_trajectory():
    """effopd(sgd) under a partial mask, with every jump undone, must follow plain masked SGD."""
    from opd_jax.optim import find_state, undo_jump

    mask = {"a": jnp.asarray([True, False, True]), "b": jnp.asarray([[False, False]])}
    plain = masked_optimizer(optax.sgd(0.05), mask)
    jumpy = masked_optimizer(effopd(optax.sgd(0.05), window=2, alpha_max=3.0, min_cos=-1.0), mask)
    p_ref = p = jax.tree.map(jnp.zeros_like, TARGET)
    s_ref, s = plain.init(p_ref), jumpy.init(p)
    undone = 0
    for _ in range(12):
        u, s_ref = plain.update(quad_grad(p_ref), s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        u, s = jumpy.update(quad_grad(p), s, p)
        p = optax.apply_updates(p, u)
        st = find_state(s)
        if jumped(st):
            assert not np.allclose(p["a"], p_ref["a"], atol=1e-3)  # the jump did move the parameters
            p = undo_jump(p, st, mask)
            undone += 1
        for k in p:
            np.testing.assert_allclose(p[k], p_ref[k], atol=1e-6)
    assert undone == 5  # windows end at steps 2, 4, ..., 12; the first has no previous direction
    assert find_state(plain.init(p_ref)) is None


def test_bfloat16_parameters_with_float32_adam_state_match_a_numpy_reference():
    """optim.state_dtype=float32 under bfloat16 parameters: Adam's moments are float32 and each step is
    p <- bf16(p + u) with u computed in float32 from the (exact) float32 gradient. Reference: Adam
    written out in numpy float64, the parameter rounded to bfloat16 after every step. Updates far below
    half a bfloat16 step of their weight are lost, so a small-learning-rate coordinate never moves."""
    import ml_dtypes
    from opd_jax.config import OptimConfig
    from opd_jax.optim import make_optimizer

    bf16 = ml_dtypes.bfloat16
    p = {"w": jnp.asarray([1.0, -0.5, 0.25, 8.0], jnp.bfloat16)}
    grads = [np.array([0.3, -1.0, 2.0, 0.5]), np.array([0.1, 0.4, -2.0, 0.5]), np.array([-0.2, 0.3, 1.0, 0.5])]
    lr, b1, b2, eps = 1e-2, 0.9, 0.99, 1e-8
    opt = make_optimizer(OptimConfig(lr=lr, b1=b1, b2=b2, clip_norm=0.0, state_dtype="float32"), 10)
    state = opt.init(p)
    assert {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype("float32")}
    ref, m, v = np.asarray(p["w"], np.float64), np.zeros(4), np.zeros(4)
    for t, g in enumerate(grads, 1):
        u, state = opt.update({"w": jnp.asarray(g, jnp.bfloat16)}, state, p)
        p = optax.apply_updates(p, u)
        assert p["w"].dtype == jnp.bfloat16
        gb = np.asarray(np.asarray(g, bf16), np.float64)  # the gradient as the bf16 model hands it over
        m, v = b1 * m + (1 - b1) * gb, b2 * v + (1 - b2) * gb ** 2
        step = -lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        ref = np.asarray(np.asarray(ref + step, np.float32).astype(bf16), np.float64)
        np.testing.assert_array_equal(np.asarray(p["w"], np.float64), ref)
    # the weight 8.0 (bf16 step 1/16) takes three steps of 1e-2 and never moves; the others do
    assert float(p["w"][3]) == 8.0 and np.all(np.asarray(p["w"][:3], np.float32) != np.array([1.0, -0.5, 0.25]))
    from opd_jax.errors import OpdError
    for bad in ("int8", "float33"):
        with pytest.raises(OpdError, match="optim.state_dtype must be a floating dtype"):
            make_optimizer(OptimConfig(state_dtype=bad), 10)
