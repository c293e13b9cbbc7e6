"""The train step on a device mesh equals the single-device step (float32, 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opd_jax.batch import Part
from opd_jax.config import LossConfig
from opd_jax.models import ModelConfig, init_model
from opd_jax.sharding import batch_sharding, make_mesh, param_shardings
from opd_jax.train_step import StepSpec, TrainState, train_step

CFG = ModelConfig.for_family("qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4,
                             num_kv_heads=2, head_dim=8, max_position_embeddings=64)
B, P, N = 8, 6, 5


def _batches():
    rng = np.random.RandomState(0)
    out = []
    for _ in range(3):
        mask = (rng.uniform(size=(B, N)) > 0.2).astype(np.int32)
        mask[:, 0] = 1
        out.append({"on": Part(jnp.asarray(rng.randint(3, 64, (B, P + N)), jnp.int32), jnp.ones((B, P), jnp.int32),
                               jnp.asarray(mask), jnp.asarray(rng.normal(size=(B, N, 64)), jnp.float32),
                               jnp.asarray(-rng.uniform(0, 3, (B, N)), jnp.float32), jnp.zeros((B,), jnp.float32))})
    return out


def _run(mesh):
    model = init_model(CFG, seed=3)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    # SGD: parameters move by lr * gradient, so equal gradients (to float32 reduction order) give
    # equal parameters; Adam would divide tiny gradient differences by tiny second moments
    opt = optax.sgd(0.5, momentum=0.9)
    if mesh is not None:
        params = jax.device_put(params, param_shardings(model, mesh))
    opt_state = jax.jit(opt.init)(params)
    initial = jax.tree.map(np.asarray, params)
    state = TrainState(params, opt_state, jnp.zeros((), jnp.int32), jax.random.key_data(jax.random.key(0)),
                       jnp.zeros((), jnp.int32))
    spec = StepSpec(LossConfig(estimator_type="full", kind="jsd"), prompt_len=P, group_size=1, temperature=1.0)
    losses = []
    for batch in _batches():
        if mesh is not None:
            batch = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(x, mesh)), batch)
        state, metrics = train_step(graphdef, opt, spec, state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params), state.params, initial


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_three_steps_on_a_mesh_equal_one_device(shape):
    ref_losses, ref_params, _, initial = _run(None)
    mesh = make_mesh(shape)
    losses, params, live, _ = _run(mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial)))
    assert moved > 1e-3  # the steps really changed the parameters
    assert len(jax.tree.leaves(live)[0].sharding.device_set) == 8  # the parameters really were on the mesh


def test_trainer_step_has_explicit_shardings_and_compiles_once(tmp_path):
    """The run's update keeps params / optimizer state on their rule-given shardings, is traced and
    compiled once for the run (ahead of time; the loop runs that executable), and the teacher forward
    is placed the same way and compiled once."""
    from opd_jax import teachers as T
    from opd_jax import train_step as step_mod
    from opd_jax.config import load_config
    from opd_jax.run import build_run
    from opd_jax.sharding import DEFAULT_RULES, logical_to_spec
    from conftest import run_steps, tiny_overrides

    cfg = load_config(None, tiny_overrides(tmp_path / "r", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                                               "data.per_domain": 4, "train.steps": 3}))
    traces = step_mod.TRACES["update"]
    run = build_run(cfg)
    misses = T._sharded_scores.cache_info().misses
    state, _ = run_steps(run, 3)
    assert step_mod.TRACES["update"] - traces == 1
    assert T._sharded_scores.cache_info().misses - misses <= 1  # one teacher program, reused every step
    assert dict(run.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    embed = state.params["embed"]
    assert embed.sharding.spec == logical_to_spec(("vocab", "embed"), embed.shape, run.mesh, DEFAULT_RULES)
    assert embed.sharding.spec != ()  # really split (vocab 64 over tensor, width 32 over fsdp)
    for p, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(run.state_sh.params)):
        assert p.sharding == s
    mu = [x for x in jax.tree.leaves(state.opt_state) if x.shape == embed.shape]
    assert mu and all(x.sharding == embed.sharding for x in mu)  # optimizer moments sharded like their params
    (teacher,) = run.teachers.values()
    assert len(jax.tree.leaves(teacher.state)[0].sharding.device_set) == 8
    assert int(state.step) == int(state.data_position) == 3


def test_student_is_read_straight_onto_its_shardings(tmp_path):
    """A student from a Hugging Face folder arrives on the mesh already split by its rules: each device
    receives its own slice from the reader, no device ever holds a whole split parameter."""
    from opd_jax.config import ModelSpec
    from opd_jax.models import save_model
    from opd_jax.sharding import named_sharding
    from opd_jax.run import build_student

    folder = save_model(init_model(CFG, seed=5), tmp_path / "student")
    mesh = make_mesh((1, 4, 2))
    model = build_student(ModelSpec(path=str(folder)), seed=0, mesh=mesh)
    split = 0
    for var in jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        x = var.get_value()
        assert x.sharding == named_sharding(var.get_metadata()["logical_axes"], x.shape, mesh)
        if any(axis is not None for axis in x.sharding.spec):
            split += 1
            assert all(s.data.size < x.size for s in x.addressable_shards)
    assert split >= 5  # embeddings and the layer matrices really are split
