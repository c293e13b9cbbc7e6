"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded index).

Loading builds the model abstractly (`nnx.eval_shape`, no memory), then fills each parameter with
`jax.make_array_from_callback`, so each device's shard is read from the safetensors file(s)
straight into its target sharding, one parameter at a time. Pickle checkpoints are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from opd_jax.errors import OpdError
from opd_jax.models.config import ModelConfig
from opd_jax.models.transformer import Transformer, layer_param_specs
from opd_jax import sharding as shd

_HF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
# Parameters stored [out, in] by torch Linear, [in, ...out] here: transpose then reshape.
_TRANSPOSED = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head"}
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def hf_to_ours(name: str, x: np.ndarray, shape: tuple, hf_name: str = "") -> np.ndarray:
    """One HF tensor (one layer's) -> our layout of per-layer `shape`."""
    expected = hf_shape(name, shape)
    if tuple(x.shape) != expected:
        raise OpdError(f"tensor {hf_name or name!r} has shape {tuple(x.shape)} but config.json implies {expected}")
    return (x.T if name in _TRANSPOSED else x).reshape(shape)


def hf_shape(name: str, shape: tuple) -> tuple:
    """The Hugging Face shape of one layer's tensor whose shape here is `shape`."""
    if name in ("wq", "wk", "wv"):
        shape = (shape[0], shape[1] * shape[2])
    elif name == "wo":
        shape = (shape[0] * shape[1], shape[2])
    elif name in ("bq", "bk", "bv"):
        shape = (shape[0] * shape[1],)
    return tuple(reversed(shape)) if name in _TRANSPOSED else tuple(shape)


def ours_to_hf(name: str, x: np.ndarray) -> np.ndarray:
    """Inverse of `hf_to_ours` for one layer's array."""
    if name in ("wq", "wk", "wv"):
        x = x.reshape(x.shape[0], -1)
    elif name in ("wo",):
        x = x.reshape(-1, x.shape[-1])
    elif name in ("bq", "bk", "bv"):
        x = x.reshape(-1)
    return np.ascontiguousarray(x.T) if name in _TRANSPOSED else x


def _open_safetensors(path: Path):
    if not path.exists():
        raise OpdError(f"checkpoint file missing: {path}")
    try:
        return safe_open(path, "np")
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise OpdError(f"cannot read {path}: corrupt or not safetensors ({e})") from None


class _TensorIndex:
    """name -> file for a folder with model.safetensors or model.safetensors.index.json."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: folder / v for k, v in weight_map.items()}
        elif single.exists():
            self.files = {k: single for k in _open_safetensors(single).keys()}
        else:
            pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
            if pickles:
                raise OpdError(
                    f"{folder} holds only pickle weights ({pickles[0]}); pickle is never loaded: convert "
                    "it to safetensors first (e.g. transformers save_pretrained(..., safe_serialization=True))"
                )
            raise OpdError(f"no model.safetensors or model.safetensors.index.json in {folder}")
        self._open: dict[Path, object] = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise OpdError(f"tensor {name!r} missing from the checkpoint")
        path = self.files[name]
        if path not in self._open:
            self._open[path] = _open_safetensors(path)
        return self._open[path].get_tensor(name)


def read_config(folder: str | os.PathLike, *, param_dtype="float32", dtype=None) -> ModelConfig:
    folder = Path(folder)
    if not folder.exists():
        raise OpdError(f"model path does not exist: {folder}")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise OpdError(f"no config.json in {folder}")
    try:
        d = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise OpdError(f"{cfg_path} is not valid JSON: {e}") from None
    return ModelConfig.from_hf(d, param_dtype=param_dtype, dtype=dtype)


def load_model(path, dtype: str = "float32", mesh=None, *, compute_dtype: str | None = None,
               rules=None) -> Transformer:
    """Load a Hugging Face Llama 3 / Qwen2 / Qwen3 folder into a `Transformer`.

    dtype: parameter dtype ("float32" or "bfloat16"); compute_dtype defaults to it.
    mesh: a `jax.sharding.Mesh`; parameters are placed by their logical axes and `rules`.
    Without a mesh everything goes to the default device.
    """
    folder = Path(path)
    cfg = read_config(folder, param_dtype=dtype, dtype=compute_dtype)
    tensors = _TensorIndex(folder)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    np_dtype = _NP_DTYPES[dtype]

    def full_tensor(key: str, shape: tuple) -> np.ndarray:
        if key in _TOP:
            return hf_to_ours(key, tensors.get(_TOP[key]), shape, _TOP[key])
        names = [f"model.layers.{i}.{_HF_LAYER[key]}" for i in range(cfg.num_layers)]
        return np.stack([hf_to_ours(key, tensors.get(n), shape[1:], n) for n in names])

    def load_one(path_key, var):
        key = path_key[-1].key if hasattr(path_key[-1], "key") else str(path_key[-1])
        shape = tuple(var.shape)
        if mesh is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = shd.named_sharding(var.get_metadata()["logical_axes"], shape, mesh, rules)
        cache: dict = {}

        def callback(index):
            if "x" not in cache:  # read once per parameter, hand each device its slice
                cache["x"] = full_tensor(key, shape).astype(np_dtype)
            return cache["x"][index]

        arr = jax.make_array_from_callback(shape, sharding, callback)
        cache.clear()
        return var.copy(arr)

    state = jax.tree_util.tree_map_with_path(load_one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def _to_host(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_model(model: Transformer, path, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `model` as a Hugging Face folder: config.json + safetensors (sharded past max_shard_bytes).

    Tensors are written in the parameter dtype. In a multi-process run every process must call
    this (parameters are gathered), and only process 0 writes.
    """
    cfg: ModelConfig = model.cfg
    if cfg.lora_rank:
        raise OpdError("this model carries LoRA adapters, which a Hugging Face folder of the base would drop; export "
                       "them as a PEFT folder (opd-jax export --lora) or merged into the weights (--merge)")
    out = Path(path)
    write = jax.process_index() == 0
    if write:
        out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0

    def add(name, arr):
        nonlocal size
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes

    add(_TOP["embed"], _to_host(model.embed[...]))
    for key in layer_param_specs(cfg):
        stacked = _to_host(getattr(model.layers, key)[...])
        for i in range(cfg.num_layers):
            add(f"model.layers.{i}.{_HF_LAYER[key]}", ours_to_hf(key, stacked[i]))
    add(_TOP["final_norm"], _to_host(model.final_norm[...]))
    if not cfg.tie_word_embeddings:
        add(_TOP["lm_head"], ours_to_hf("lm_head", _to_host(model.lm_head[...])))
    if not write:
        return out
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata=meta)
        (out / "model.safetensors.index.json").unlink(missing_ok=True)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata=meta)
            weight_map.update({k: fname for k in shard})
            total += sum(a.nbytes for a in shard.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (out / "model.safetensors").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    return out
