"""Model structure: scanned layers, dtypes, the chunk-friendly hidden-state API."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import opd_jax
from opd_jax.models import ModelConfig, init_model


def _lowered_text(cfg):
    graphdef, state = nnx.split(init_model(cfg))
    ids = jnp.zeros((2, 8), jnp.int32)

    @jax.jit
    def fwd(state, ids):
        return nnx.merge(graphdef, state)(ids)

    return fwd.lower(state, ids).as_text()


def test_depth_does_not_grow_the_program():
    base = ModelConfig.for_family("qwen3", num_layers=2)
    two, eight = _lowered_text(base), _lowered_text(base.replace(num_layers=8))
    dots2 = len(re.findall(r"dot_general", two))
    dots8 = len(re.findall(r"dot_general", eight))
    assert dots2 == dots8 > 0  # one layer body in both programs, run by a loop
    assert "stablehlo.while" in eight


def test_hidden_states_times_output_matrix_is_the_logits():
    for tied in (False, True):
        model = init_model(ModelConfig.for_family("llama", tie_word_embeddings=tied), seed=1)
        ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 6)))
        h = model.hidden_states(ids)
        w = model.output_matrix()
        assert h.shape == (2, 6, 64) and w.shape == (64, 256)
        np.testing.assert_allclose(np.asarray(h @ w), np.asarray(model(ids)), rtol=1e-5, atol=1e-6)
        assert hasattr(model, "lm_head") != tied


def test_bfloat16_params_and_compute_track_float32():
    cfg = ModelConfig.for_family("qwen2")
    f32 = init_model(cfg, seed=2)
    bf16 = init_model(cfg.replace(param_dtype="bfloat16", dtype="bfloat16"), seed=2)
    assert bf16.layers.wq[...].dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, 10)))
    a, b = np.asarray(f32(ids)), np.asarray(bf16(ids))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-3


def test_bad_config_values_are_one_line_errors():
    for kw, msg in [(dict(model_type="gpt2"), "unsupported model_type"),
                    (dict(param_dtype="float16"), "param_dtype"),
                    (dict(num_heads=4, num_kv_heads=3), "multiple")]:
        try:
            ModelConfig(**kw)
        except opd_jax.OpdError as e:
            assert msg in str(e) and "\n" not in str(e)
        else:
            raise AssertionError(f"{kw} accepted")
