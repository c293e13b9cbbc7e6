"""Orbax checkpoints of the TrainState: an exact round trip on a mesh, and clear refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import OpdError
from opd_jax import checkpoint as ckpt
from opd_jax.sharding import make_mesh, named_sharding, replicated
from opd_jax.train_step import TrainState


def _state(seed, mesh):
    rng = np.random.RandomState(seed)
    w = jax.device_put(jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), named_sharding(("embed", None), (8, 4), mesh))
    return TrainState({"w": w}, {"mu": w * 0.5}, jax.device_put(jnp.int32(seed), replicated(mesh)),
                      jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated(mesh)),
                      jax.device_put(jnp.int32(seed), replicated(mesh)))


def test_the_train_state_round_trips_exactly_with_its_shardings(tmp_path):
    mesh = make_mesh((1, 8, 1))
    mgr = ckpt.manager(tmp_path / "c", keep=2)
    for step in (1, 2, 3):
        ckpt.save(mgr, step, _state(step, mesh)._asdict())
    assert sorted(mgr.all_steps()) == [2, 3]  # keep=2
    like = _state(0, mesh)._asdict()
    step, got = ckpt.restore_latest(mgr, like)
    want = _state(3, mesh)
    assert step == 3
    for k in TrainState._fields:
        for a, b in zip(jax.tree.leaves(got[k]), jax.tree.leaves(getattr(want, k))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert a.sharding == b.sharding
    assert ckpt.restore_latest(mgr, like, step=2)[0] == 2
    with pytest.raises(OpdError, match=r"there is no checkpoint for step 1 in .* \(it holds steps \[2, 3\]\)"):
        ckpt.restore_latest(mgr, like, step=1)


def test_an_empty_folder_restores_nothing_and_keep_zero_is_refused(tmp_path):
    mesh = make_mesh((1, 8, 1))
    assert ckpt.restore_latest(ckpt.manager(tmp_path / "empty"), _state(0, mesh)._asdict()) is None
    with pytest.raises(OpdError, match="keep_checkpoints must be >= 1"):
        ckpt.manager(tmp_path / "k0", keep=0)


def test_a_restore_error_is_one_readable_sentence():
    class Fragmented(Exception):
        pass

    e = Fragmented("Failed to read array data: truncated file <bound method pybind11_detail_function_record_v1 at 0x1>")
    assert ckpt._reason(e) == "Failed to read array data: truncated file"
