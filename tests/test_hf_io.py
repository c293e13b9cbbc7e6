"""Hugging Face folders: round trips, sharded files, sharded placement, and one-line errors."""

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import opd_jax
from opd_jax.sharding import make_mesh, logical_to_spec
from conftest import FAMILIES


def _params(model):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_save_load_is_bit_exact(hf_checkpoints, tmp_path, dtype):
    folder = hf_checkpoints["qwen2"][0]
    a = opd_jax.load_model(folder, dtype=dtype)
    opd_jax.save_model(a, tmp_path / "out")
    b = opd_jax.load_model(tmp_path / "out", dtype=dtype)
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys() and len(pa) >= 10
    for k in pa:
        assert pa[k].dtype == np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
        np.testing.assert_array_equal(pa[k].view(np.uint8), pb[k].view(np.uint8), err_msg=k)
    # and the written tensors are the original ones (same names, same bits in float32)
    if dtype == "float32":
        orig, saved = load_file(folder / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
        assert orig.keys() == saved.keys()
        for k in orig:
            np.testing.assert_array_equal(orig[k], saved[k], err_msg=k)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_loads_in_transformers(hf_checkpoints, tmp_path, family):
    model = opd_jax.load_model(hf_checkpoints[family][0])
    out = opd_jax.save_model(model, tmp_path / "export", max_shard_bytes=40_000)  # forces several files
    assert (out / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.RandomState(3).randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = reloaded(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=1e-4)
    again = opd_jax.load_model(out)  # and the sharded index loads back here
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(ids))), ref, atol=1e-4)


def test_load_onto_mesh_places_each_parameter_by_its_logical_axes(hf_checkpoints):
    folder = hf_checkpoints["llama"][0]
    mesh = make_mesh((1, 2, 4))
    model = opd_jax.load_model(folder, mesh=mesh)
    wq = model.layers.wq
    assert wq.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
    assert wq[...].sharding.spec == logical_to_spec(wq.get_metadata()["logical_axes"], wq.shape, mesh)
    assert wq[...].sharding.spec[1] == "fsdp" and wq[...].sharding.spec[2] == "tensor"
    assert len(wq[...].addressable_shards) == 8 and wq[...].addressable_shards[0].data.shape == (2, 32, 1, 16)
    plain = opd_jax.load_model(folder)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 7)))
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(plain(ids)), atol=1e-5)


def test_every_parameter_has_logical_axes_of_its_rank(hf_checkpoints):
    model = opd_jax.load_model(hf_checkpoints["qwen3"][0])
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var.ndim, path
        assert set(axes) <= {"embed", "mlp", "heads", "kv_heads", "vocab", "layers", "head_dim", "norm"}


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(opd_jax.OpdError, match="does not exist"):
        opd_jax.load_model(tmp_path / "nope")


def test_pickle_checkpoint_is_refused(hf_checkpoints, tmp_path):
    dst = _copy(hf_checkpoints["qwen3"][0], tmp_path)
    (dst / "model.safetensors").unlink()
    (dst / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(opd_jax.OpdError, match="pickle.*convert") as e:
        opd_jax.load_model(dst)
    assert "\n" not in str(e.value)


def test_unsupported_model_type_lists_supported(hf_checkpoints, tmp_path):
    dst = _copy(hf_checkpoints["qwen3"][0], tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(opd_jax.OpdError, match="unsupported model_type 'gpt2'.*llama, qwen2, qwen3"):
        opd_jax.load_model(dst)


def test_shape_mismatch_names_the_tensor(hf_checkpoints, tmp_path):
    dst = _copy(hf_checkpoints["qwen3"][0], tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(opd_jax.OpdError, match="mlp.*shape"):
        opd_jax.load_model(dst)


def test_corrupt_safetensors_is_a_clear_error(hf_checkpoints, tmp_path):
    dst = _copy(hf_checkpoints["qwen3"][0], tmp_path)
    (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(opd_jax.OpdError, match="corrupt"):
        opd_jax.load_model(dst)


def test_missing_tensor_is_named(hf_checkpoints, tmp_path):
    dst = _copy(hf_checkpoints["qwen3"][0], tmp_path)
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(opd_jax.OpdError, match="model.layers.1.mlp.up_proj.weight"):
        opd_jax.load_model(dst)


def test_hf_config_round_trips_through_autoconfig(tmp_path):
    cfg = opd_jax.ModelConfig.for_family("llama", rope_scaling=tuple(sorted({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}.items())), rope_theta=500000.0)
    model = opd_jax.init_model(cfg)
    opd_jax.save_model(model, tmp_path / "m")
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "m")
    assert hf.model_type == "llama" and hf.num_hidden_layers == 2 and hf.head_dim == 16
    assert opd_jax.models.read_config(tmp_path / "m") == cfg
