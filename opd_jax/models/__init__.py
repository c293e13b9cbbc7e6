"""Decoder-only transformers (Llama 3 / Qwen2 / Qwen3) and their Hugging Face interop."""

from opd_jax.models.config import ModelConfig, SUPPORTED_MODEL_TYPES
from opd_jax.models.transformer import Transformer, init_cache, init_model, positions_from_mask
from opd_jax.models.hf_io import load_model, save_model, read_config

__all__ = ["ModelConfig", "SUPPORTED_MODEL_TYPES", "Transformer", "init_cache", "init_model",
           "positions_from_mask", "load_model", "save_model", "read_config"]
