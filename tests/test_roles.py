"""Roles on their own devices (mesh.roles): a teacher on devices 4-7 and the learner on 0-3 train
exactly like the co-located teacher; the sampler on devices of its own too; bad role specs refused."""

import jax
import numpy as np
import pytest

from opd_jax.config import load_config
from opd_jax.errors import OpdError
from opd_jax.run import build_run

from conftest import host, random_teacher, run_steps, tiny_overrides


def _run(tmp_path, name, roles, **extra):
    over = {"loss.estimator_type": "full", "loss.kind": "forward_kl", "mesh.roles": roles,
            **random_teacher(tmp_path), **extra}
    return build_run(load_config(None, tiny_overrides(tmp_path / name, **over)))


@pytest.mark.parametrize("extra", [{}, {"train.max_staleness": 1}], ids=["sync", "async"])
def test_teacher_and_sampler_on_their_own_devices_train_like_colocated(tmp_path, extra):
    """Learner 0-3 with the teacher on 4-7 (and, second run, the sampler on 4-7 as well) gives the
    co-located run's losses and parameters after 2 steps (1e-6): teacher outputs and weights cross
    device sets, nothing else changes."""
    ref_run = _run(tmp_path, "a", "{learner: 0-3}", **extra)
    ids = {d.id for d in jax.devices()[4:]}
    runs = {"teacher+sampler": _run(tmp_path, "c", "{learner: 0-3, t: 4-7, sampler: 4-7}", **extra)}
    if not extra:  # the teacher alone on its devices (synchronous only: the asynchronous run moves both)
        runs["teacher"] = _run(tmp_path, "b", "{learner: 0-3, t: 4-7}", **extra)
    t = runs["teacher+sampler"].teachers["t"]
    assert {d.id for x in jax.tree.leaves(t.state) for d in x.sharding.device_set} == ids
    assert {d.id for x in jax.tree.leaves(runs["teacher+sampler"].init.params)
            for d in x.sharding.device_set} == {0, 1, 2, 3}
    ref, ref_last = run_steps(ref_run, 2)
    for name, run in runs.items():
        state, last = run_steps(run, 2)
        np.testing.assert_allclose(last["loss"], ref_last["loss"], rtol=1e-6, err_msg=name)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), host(state.params),
                     host(ref.params))


def test_bad_roles_are_one_line_errors(tmp_path):
    with pytest.raises(OpdError, match="mesh.roles.t: devices '4-9' must be distinct indices in \\[0, 7\\]"):
        _run(tmp_path, "x", "{t: 4-9}")
    with pytest.raises(OpdError, match="mesh.roles names 'teach'.*learner, sampler, t"):
        _run(tmp_path, "y", "{teach: 4-7}")
