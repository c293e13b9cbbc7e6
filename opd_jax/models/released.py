"""Shapes of released checkpoints (their config.json), for planning a run before any weights exist.

`write_config_only(name, folder)` writes a folder that holds only a config.json: `load_model` would
refuse it (no safetensors), but `opd-jax plan` and the fit check read nothing else. Used by the
recipe tests and scripts/bench_step_memory.py; names not listed get the 8B shape (the recipes'
fine-tuned 8B teachers).
"""

from __future__ import annotations

import json
from pathlib import Path

from opd_jax.models.config import ModelConfig

QWEN3 = {
    "Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8,
                       tie_word_embeddings=True),
    "Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8,
                     tie_word_embeddings=True),
    "Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8,
                     tie_word_embeddings=False),
    "Qwen3-32B": dict(hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64, num_kv_heads=8,
                      tie_word_embeddings=False),
}


def qwen3_config(name: str, num_layers: int | None = None) -> ModelConfig:
    """The bfloat16 ModelConfig of a released Qwen3 size (unknown names: the 8B shape)."""
    shape = dict(QWEN3.get(name, QWEN3["Qwen3-8B"]))
    if num_layers:
        shape["num_layers"] = num_layers
    return ModelConfig.for_family("qwen3", vocab_size=151936, head_dim=128, max_position_embeddings=40960,
                                  rope_theta=1e6, param_dtype="bfloat16", dtype="bfloat16", **shape)


def write_config_only(name: str, folder: str | Path, num_layers: int | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(qwen3_config(name, num_layers).to_hf()))
    return folder


def config_only_recipe(text: str, root: str | Path, num_layers: int | None = None) -> str:
    """A recipe's text with every /mnt/shared/models/X pointed at a config-only folder of X under root."""
    import re

    for name in set(re.findall(r"/mnt/shared/models/([\w.\-]+)", text)):
        write_config_only(name, Path(root) / name, num_layers)
    return text.replace("/mnt/shared/models/", f"{Path(root)}/")
