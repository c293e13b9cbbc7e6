"""Model configuration: one frozen dataclass for the Llama 3 / Qwen2 / Qwen3 decoder families.

`ModelConfig.from_hf(d)` reads a Hugging Face `config.json` dict (both the transformers 4 layout,
`rope_theta` + `rope_scaling`, and the transformers 5 layout, `rope_parameters`);
`ModelConfig.to_hf()` writes one back that `transformers.AutoConfig` reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from opd_jax.errors import OpdError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    `rope_scaling` is a sorted tuple of (key, value) pairs (hashable, so the config can be a static
    jit argument) or None. `qkv_bias` is Qwen2's bias on q/k/v; `qk_norm` is Qwen3's per-head RMSNorm
    on queries and keys before RoPE.
    """

    model_type: str = "qwen3"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = True
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    # runtime choices (never written to config.json): attention implementation (see models.attention)
    # and the rematerialisation policy of the layer body under differentiation: full | dots | none
    attention: str = "auto"
    attention_block: int = 512
    remat: str = "none"
    # LoRA adapters on the layers (opd_jax.lora; never written to config.json): rank (0: none), alpha, and
    # the base weights they adapt (wq, wk, wv, wo, w_gate, w_up, w_down)
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple = ()

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise OpdError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise OpdError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise OpdError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def for_family(cls, model_type: str, **kw) -> "ModelConfig":
        """Family defaults: Qwen2 has q/k/v bias, Qwen3 has q/k norm, Llama has neither."""
        fam = {"llama": dict(qkv_bias=False, qk_norm=False),
               "qwen2": dict(qkv_bias=True, qk_norm=False),
               "qwen3": dict(qkv_bias=False, qk_norm=True)}
        if model_type not in fam:
            raise OpdError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        return cls(model_type=model_type, **{**fam[model_type], **kw})

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, param_dtype: str = "float32", dtype: str | None = None):
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise OpdError(
                f"unsupported model_type {mt!r} in config.json; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise OpdError(f"unsupported hidden_act {d['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
        if mt == "llama" and (d.get("attention_bias") or d.get("mlp_bias")):
            raise OpdError("llama configs with attention_bias or mlp_bias are not supported")
        if mt in ("qwen2", "qwen3") and d.get("use_sliding_window"):
            raise OpdError(f"{mt} with use_sliding_window=true is not supported")
        rope = dict(d.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = rope or dict(d.get("rope_scaling") or {})
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        if rtype not in ("default", "llama3"):
            raise OpdError(f"unsupported rope type {rtype!r}; supported: default, llama3")
        scaling = None if rtype == "default" else tuple(sorted(
            (k, v) for k, v in scaling.items() if k != "type"))
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=(mt == "qwen2"),
            qk_norm=(mt == "qwen3"),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            param_dtype=param_dtype,
            dtype=dtype or param_dtype,
        )

    def to_hf(self) -> dict[str, Any]:
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(dict(self.rope_scaling))
        d = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            # both layouts, so transformers 4 and 5 read the same RoPE
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }
        if self.rope_scaling:
            d["rope_scaling"] = {**dict(self.rope_scaling), "rope_type": "llama3"}
        if self.model_type == "llama":
            d.update(attention_bias=False, mlp_bias=False)
        else:
            d.update(use_sliding_window=False, sliding_window=None)
        return d
