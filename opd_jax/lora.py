"""LoRA: low-rank adapters on the scanned layers' projections of a frozen base (`student.lora`).

For a target projection W (per layer [in..., out...], the layout of `transformer.layer_param_specs`) the
adapted layer computes

    y = x W + (alpha / r) (x A) B,        A [in..., r],  B [r, out...]

with A ~ N(0, 1 / fan_in) and B = 0, so at step 0 the student is its base exactly. The adapters are
`nnx.LoRAParam` variables on `Transformer.layers` named `{w}_lora_a` / `{w}_lora_b`, stacked over the
layers like their base and carrying the base's logical axes on their in / out dims (the rank axis is
never sharded), so the rules table shards them like the weight they adapt.

Only the adapters train. In the parameters' pure dict, `split` separates them from the frozen base and
`join` puts them back; the update differentiates, clips, optimises, masks and guards the adapters alone
(`train_step.update`), so the gradient and the optimizer state exist for them only and the base comes
out of every step bit for bit as it went in.

PEFT's layout (`opd-jax export --lora`): per layer and module, lora_A.weight [r, in] = A^T and
lora_B.weight [out, r] = B^T (in / out flattened over heads), scaling lora_alpha / r. The forward's
adapter term is `models.layers.lora_delta`.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from opd_jax.errors import OpdError

# target name -> the base weight it adapts (transformer.layer_param_specs) and PEFT's module name
TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
PEFT_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
KEYS = ("rank", "alpha", "targets")
SUFFIXES = ("_lora_a", "_lora_b")


def check_lora(spec: dict) -> tuple[int, float, tuple[str, ...]] | None:
    """student.lora {rank, alpha, targets} -> (rank, alpha, base weight names), None when empty; one-line
    errors for unknown keys, a rank <= 0, an alpha <= 0 and unknown targets. alpha defaults to the rank
    (scaling 1); targets default to every projection (q, k, v, o, gate, up, down)."""
    if not spec:
        return None
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise OpdError(f"student.lora: unknown key {unknown[0]!r}; valid keys: {', '.join(KEYS)}")
    rank = spec.get("rank", 0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise OpdError(f"student.lora.rank must be a positive integer, got {rank!r}")
    alpha = spec.get("alpha", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise OpdError(f"student.lora.alpha must be a positive number, got {alpha!r}")
    targets = spec.get("targets", list(TARGETS))
    targets = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise OpdError(f"student.lora.targets: unknown target {bad[0] if bad else '(none given)'!r}; "
                       f"choose from {', '.join(TARGETS)}")
    return rank, float(alpha), tuple(TARGETS[t] for t in TARGETS if t in targets)


def add_adapters(model, rank: int, alpha: float, targets: tuple[str, ...], seed: int = 0):
    """Put adapters on a built `model` in place (A normal with std 1 / sqrt(fan_in), B zeros: step 0 is the
    base; float32 whatever the base's dtype) and record them in its config (lora_rank, lora_alpha,
    lora_targets) -> the model. A model built from a config that has them (`transformer.Layers`) gets
    the same adapters."""
    from opd_jax.models.transformer import add_lora

    model.cfg = model.cfg.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets))
    add_lora(model.layers, model.cfg, nnx.Rngs(params=seed))
    return model


def with_lora(cfg, spec: dict):
    """A ModelConfig with student.lora's adapters recorded (the planner's shapes), unchanged without them."""
    lora = check_lora(spec)
    return cfg if lora is None else cfg.replace(lora_rank=lora[0], lora_alpha=lora[1], lora_targets=lora[2])


def is_adapter(key: str) -> bool:
    return key.endswith(SUFFIXES)


def split(params: dict) -> tuple[dict, dict | None]:
    """The parameters' pure dict -> (adapters, base): (params, None) for a model without adapters."""
    layers = params.get("layers", {})
    if not any(is_adapter(k) for k in layers):
        return params, None
    adapters = {"layers": {k: v for k, v in layers.items() if is_adapter(k)}}
    base = {**params, "layers": {k: v for k, v in layers.items() if not is_adapter(k)}}
    return adapters, base


def join(adapters: dict, base: dict | None) -> dict:
    """The inverse of `split`."""
    if base is None:
        return adapters
    return {**base, "layers": {**base["layers"], **adapters["layers"]}}


def trainable(params: dict) -> dict:
    """What the optimizer sees: the adapters when there are any, else every parameter."""
    return split(params)[0]


def base_config(cfg):
    """The ModelConfig of the base alone (adapters off)."""
    return cfg.replace(lora_rank=0, lora_alpha=0.0, lora_targets=())


def base_graphdef(cfg):
    """The graphdef of a model of `cfg` without adapters, built from shapes (no weights)."""
    from opd_jax.models.transformer import Transformer

    return nnx.split(nnx.eval_shape(lambda: Transformer(base_config(cfg), rngs=nnx.Rngs(0))))[0]


def merged_params(params: dict, cfg) -> dict:
    """The base with every adapter folded in, W + (alpha / r) A B (host numpy, the base's dtype): the
    parameters of a plain model that computes what the adapted one does."""
    adapters, base = split(params)
    if base is None:
        return params
    layers = dict(base["layers"])
    scale = cfg.lora_alpha / cfg.lora_rank
    for name in cfg.lora_targets:
        w = np.asarray(layers[name])
        a = np.asarray(adapters["layers"][name + "_lora_a"], np.float32)
        b = np.asarray(adapters["layers"][name + "_lora_b"], np.float32)
        ab = np.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], b.shape[1], -1))
        layers[name] = (w.astype(np.float32) + scale * ab.reshape(w.shape)).astype(w.dtype)
    return {**base, "layers": layers}


def peft_tensors(params: dict, cfg) -> dict[str, np.ndarray]:
    """The adapters under PEFT's key names for a Llama / Qwen model: base_model.model.model.layers.{i}.
    {module}.lora_A.weight [r, in] and .lora_B.weight [out, r], float32."""
    adapters, base = split(params)
    if base is None:
        raise OpdError("the model has no LoRA adapters (student.lora is not set)")
    out = {}
    for name in cfg.lora_targets:
        a = np.asarray(adapters["layers"][name + "_lora_a"], np.float32)  # [L, in..., r]
        b = np.asarray(adapters["layers"][name + "_lora_b"], np.float32)  # [L, r, out...]
        for i in range(a.shape[0]):
            stem = f"base_model.model.model.layers.{i}.{PEFT_MODULES[name]}"
            out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, a.shape[-1]).T)
            out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(b.shape[1], -1).T)
    return out


def peft_config(cfg, base_model: str = "") -> dict:
    """adapter_config.json for `peft_tensors`."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
            "target_modules": sorted(PEFT_MODULES[n].split(".")[-1] for n in cfg.lora_targets),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model,
            "modules_to_save": None, "layers_to_transform": None}
