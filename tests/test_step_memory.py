"""At real scale the step must never hold a [B, N, V] array (B rows, N completion tokens, V
vocabulary): 256 x 8192 x 152k float32 is 1.2 TiB. The teachers hand over hidden states and the loss
applies every output matrix chunk by chunk. Checked on the programs themselves: every array shape in
the lowered (global) and compiled program, at a shape where B * N * V is far above anything else."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opd_jax.batch import Part
from opd_jax.config import LossConfig
from opd_jax.models import ModelConfig, init_model
from opd_jax.teachers import teacher_scores
from opd_jax.losses.registry import estimator_for
from opd_jax.train_step import StepSpec, TrainState, train_step

B, P, N, V = 6, 8, 40, 1000  # B*N*V = 240,000 elements; the largest other array is the 32,000-entry embedding
CFG = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
           max_position_embeddings=64)


def shapes_in(text: str):
    """Every array shape written in a StableHLO (tensor<AxBxf32>) or HLO (f32[A,B]) program text."""
    out = [tuple(int(d) for d in m.split("x")) for m in re.findall(r"tensor<((?:\d+x)+)\w+>", text)
           for m in [m.rstrip("x")]]
    out += [tuple(int(d) for d in m.split(",")) for m in re.findall(r"\b(?:f32|bf16|f16|s32|pred)\[([\d,]+)\]", text)]
    return out


def largest(text: str) -> int:
    return max(int(np.prod(s)) for s in shapes_in(text))


def test_shape_scanner_sees_a_full_logits_array():
    """The scanner itself: a program that forms [B, N, V] logits is seen as such."""
    f = jax.jit(lambda h, w: jnp.einsum("btd,dv->btv", h, w).sum())
    lowered = f.lower(jax.ShapeDtypeStruct((B, N, 32), jnp.float32), jax.ShapeDtypeStruct((32, V), jnp.float32))
    assert largest(lowered.as_text()) == B * N * V
    assert largest(lowered.compile().as_text()) == B * N * V


@pytest.mark.parametrize("estimator", ["full", "topk"])
def test_no_rows_by_tokens_by_vocabulary_array_in_the_step(estimator):
    lc = LossConfig(estimator_type=estimator, kind="reverse_kl", topk=4, seq_chunk=8)
    assert estimator_for(lc).teacher_output == "hidden"
    student = init_model(ModelConfig(**CFG), seed=0)
    graphdef, state = nnx.split(student)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    opt = optax.sgd(0.1)
    sds = jax.ShapeDtypeStruct
    # two teachers of different widths: rows of domains 0 and 2 -> "a" (width 32), domain 1 -> "b" (width 48)
    routes = ("a", "b", "a")
    teacher = {"a": sds((4, N, 32), jnp.float32), "b": sds((2, N, 48), jnp.float32)}
    teacher_w = {"a": sds((32, V), jnp.float32), "b": sds((48, V), jnp.float32)}
    batch = {"on": Part(sds((B, P + N), jnp.int32), sds((B, P), jnp.int32), sds((B, N), jnp.int32), teacher,
                        sds((B, N), jnp.float32), sds((B,), jnp.float32))}
    state = TrainState(params, jax.eval_shape(opt.init, params), sds((), jnp.int32), sds((2,), jnp.uint32),
                       sds((), jnp.int32))
    spec = StepSpec(lc, prompt_len=P, group_size=1, temperature=0.8, routes=routes)
    lowered = train_step.lower(graphdef, opt, spec, state, batch, teacher_w)
    for text in (lowered.as_text(), lowered.compile().as_text()):
        assert largest(text) < B * N * V / 4  # per-chunk logits are [rows, 8, V]
    # the teacher side: its forward returns hidden states, not logits
    tg, tstate = nnx.split(init_model(ModelConfig(**CFG), seed=1))
    scored = teacher_scores.lower(tg, tstate, sds((B, P + N), jnp.int32), sds((B, P + N), jnp.int32), prompt_len=P,
                                  temperature=0.8, what=estimator_for(lc).teacher_output)
    assert largest(scored.compile().as_text()) < B * N * V / 4
