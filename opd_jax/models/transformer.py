"""The decoder-only transformer (Llama 3 / Qwen2 / Qwen3) in Flax NNX.

All layers' weights are stacked on a leading `layers` axis and run with one `jax.lax.scan`, so the
compiled program holds a single layer body whatever the depth. Every parameter carries its
logical axis names in the `logical_axes` metadata; `opd_jax.sharding` maps them to a mesh.

    h_0 = E[x];  for each layer l:  a = h + Attn(RMSNorm(h)),  h = a + SwiGLU(RMSNorm(a))
    logits = RMSNorm(h_L) @ W_out          (W_out = E^T when embeddings are tied)
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax.models.config import ModelConfig
from opd_jax.models import layers as L
from opd_jax.models.attention import attention, decode_attention, from_cache, to_cache

# name -> (shape builder, logical axes, init kind); shapes include the leading layers axis.
def layer_param_specs(c: ModelConfig) -> dict[str, tuple[tuple, tuple, str]]:
    n, d, h, k, dh, f = c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    specs = {
        "attn_norm": ((n, d), ("layers", "norm"), "ones"),
        "wq": ((n, d, h, dh), ("layers", "embed", "heads", "head_dim"), "normal"),
        "wk": ((n, d, k, dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wv": ((n, d, k, dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wo": ((n, h, dh, d), ("layers", "heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ((n, d), ("layers", "norm"), "ones"),
        "w_gate": ((n, d, f), ("layers", "embed", "mlp"), "normal"),
        "w_up": ((n, d, f), ("layers", "embed", "mlp"), "normal"),
        "w_down": ((n, f, d), ("layers", "mlp", "embed"), "normal"),
    }
    if c.qkv_bias:
        specs["bq"] = ((n, h, dh), ("layers", "heads", "head_dim"), "zeros")
        specs["bk"] = ((n, k, dh), ("layers", "kv_heads", "head_dim"), "zeros")
        specs["bv"] = ((n, k, dh), ("layers", "kv_heads", "head_dim"), "zeros")
    if c.qk_norm:
        specs["q_norm"] = ((n, dh), ("layers", "head_dim"), "ones")
        specs["k_norm"] = ((n, dh), ("layers", "head_dim"), "ones")
    return specs


def lora_param_specs(c: ModelConfig) -> dict[str, tuple[tuple, tuple, str]]:
    """The LoRA adapters of `c.lora_targets` (`opd_jax.lora`), as `layer_param_specs`: A [L, in..., r] and
    B [L, r, out...] with the base weight's logical axes on its in / out dims, the rank axis unsharded
    (wo's input is its first two dims [H, Dh]; every other target's is its first)."""
    base, out, r = layer_param_specs(c), {}, c.lora_rank
    for name in c.lora_targets:
        shape, axes, _ = base[name]
        k = 3 if name == "wo" else 2  # the layers axis and the input dims
        out[name + "_lora_a"] = (shape[:k] + (r,), axes[:k] + (None,), "lora_a")
        out[name + "_lora_b"] = ((shape[0], r) + shape[k:], (axes[0], None) + axes[k:], "lora_b")
    return out


def layer_names(c: ModelConfig) -> list[str]:
    """Every stacked layer weight: the base's (`layer_param_specs`) and its LoRA adapters."""
    return list(layer_param_specs(c)) + list(lora_param_specs(c))


def _param(shape, axes, kind, dtype, rngs: nnx.Rngs, std=0.02):
    if kind == "lora_a":  # LoRA adapters (nnx.LoRAParam, float32 whatever the base's dtype): A normal with
        value = jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(math.prod(shape[1:-1]))
        return nnx.LoRAParam(value, logical_axes=axes)  # std 1 / sqrt(fan_in), B zeros
    if kind == "lora_b":
        return nnx.LoRAParam(jnp.zeros(shape, jnp.float32), logical_axes=axes)
    if kind == "ones":
        value = jnp.ones(shape, dtype)
    elif kind == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class Layers(nnx.Module):
    """The stacked weights of all decoder layers (leading axis = layer index)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        for name, (shape, axes, kind) in layer_param_specs(cfg).items():
            setattr(self, name, _param(shape, axes, kind, jnp.dtype(cfg.param_dtype), rngs))
        add_lora(self, cfg, rngs)


def add_lora(layers: Layers, cfg: ModelConfig, rngs: nnx.Rngs):
    """`cfg`'s LoRA adapters on `layers` (nnx.LoRAParam; A normal with std 1 / sqrt(fan_in), B zeros, so
    the adapted model starts as its base), in float32: a bfloat16 base (student.dtype) keeps float32
    adapters and optimizer state; the forward computes in the compute dtype."""
    for name, (shape, axes, kind) in lora_param_specs(cfg).items():
        setattr(layers, name, _param(shape, axes, kind, jnp.dtype(cfg.param_dtype), rngs))


class Transformer(nnx.Module):
    """`model(input_ids [B, T], attention_mask=[B, T]) -> logits [B, T, V]` (float32).

    Positions come from the mask (`cumsum(mask) - 1`), so a left-padded row gives the same
    logits at its real tokens as the same row unpadded.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = _param((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), "normal", pd, rngs)
        self.layers = Layers(cfg, rngs)
        self.final_norm = _param((cfg.hidden_size,), ("norm",), "ones", pd, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), "normal", pd, rngs)

    # ----------------------------------------------------------------------------- public API
    def __call__(self, input_ids, attention_mask=None):
        return self.logits(self.hidden_states(input_ids, attention_mask))

    def hidden_states(self, input_ids, attention_mask=None):
        """Final (normed) hidden states [B, T, D] in the compute dtype."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        mask = attention_mask.astype(jnp.int32)
        positions = positions_from_mask(mask)
        h, _ = self.run(input_ids, positions, jnp.arange(input_ids.shape[1]), mask.astype(bool))
        return h

    def completion_hidden(self, tokens, full_mask, prompt_len: int):
        """Hidden states [B, N, D] at the positions that predict the completion tokens[:, P:]
        (positions P-1 .. P+N-2): the one alignment every loss and teacher score uses."""
        return self.hidden_states(tokens, full_mask)[:, prompt_len - 1:-1]

    def packed_hidden(self, tokens, segments, positions=None):
        """Final hidden states [R, L, D] of packed rows: tokens [R, L] hold whole sequences end to end,
        segments [R, L] int their sequence (1, 2, ... within a row; 0: padding), positions [R, L] each
        token's position in its own sequence (RoPE restarts at 0; default `segment_positions`). A token
        attends only to earlier tokens of its own segment, so each sequence gets what a forward pass of
        it alone gives."""
        segments = segments.astype(jnp.int32)
        positions = segment_positions(segments) if positions is None else positions
        h, _ = self.run(tokens, positions, jnp.arange(tokens.shape[1]), segments != 0, segments=segments)
        return h

    def output_matrix(self):
        """W_out [D, V] in the compute dtype, so logits = hidden_states @ W_out."""
        w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return w.astype(self.cfg.dtype)

    def logits(self, h):
        """h [B, T, D] -> float32 logits [B, T, V]."""
        return jnp.einsum("btd,dv->btv", h, self.output_matrix(), preferred_element_type=jnp.float32)

    # ----------------------------------------------------------------------------- core
    def split_layers(self) -> tuple[dict, ...]:
        """Each layer's weights on their own ({name: array}, one dict a layer, in the compute dtype):
        taken once outside a decode loop, a step then reads them in place instead of slicing (and,
        on XLA:CPU, copying) the stacked weights every layer of every step. Pass to `run(layers=)`."""
        dt = jnp.dtype(self.cfg.dtype)
        stacked = {name: getattr(self.layers, name)[...] for name in layer_names(self.cfg)}
        return tuple({name: w[i].astype(dt) for name, w in stacked.items()} for i in range(self.cfg.num_layers))

    def run(self, input_ids, positions, q_slots, key_valid, cache=None, write_index=0, layers=None, segments=None):
        """One pass over all layers.

        input_ids [B, T], positions [B, T] (RoPE positions), q_slots [T] (cache slot of each
        query), key_valid [B, S] (which slots hold real tokens). With `cache=(k, v)` each of shape
        [B, L, S, K, Dh], the new keys/values are written at slots write_index..write_index+T-1
        (or, with write_index [B] and T = 1, each row at its own slot) and attention runs over all S
        slots; without a cache S = T. `layers` (from `split_layers`): run the layers unrolled on those
        weights (the decode loops) instead of one loop over the stacked weights. `segments` [B, T] int
        (packed rows, without a cache): attention stays within each segment (`packed_hidden`).
        Returns (final normed hidden [B, T, D], new cache or None).
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        inv_freq = L.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        stacked = None if layers is not None else {
            name: getattr(self.layers, name)[...].astype(dt) for name in layer_names(cfg)}
        h = jnp.take(self.embed[...], input_ids, axis=0).astype(dt)

        layout = _LAYOUT.get()
        # a decode step (one new token per row) over a cache: attention reads only the filled slots;
        # attention="naive" keeps the reference path over every slot
        decoding = cache is not None and input_ids.shape[1] == 1 and cfg.attention != "naive"

        scale = cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0

        def proj(name, spec, x, p):  # x W, plus (alpha / r) (x A) B where `name` has adapters (opd_jax.lora)
            y = jnp.einsum(spec, x, p[name])
            return y + L.lora_delta(x, p, name, scale) if name + "_lora_a" in p else y

        def body(i, carry, p=None):
            h, cache = carry
            if layout is not None:  # the residual stream's rows stay on the batch mesh axes
                h = layout(h, ("batch", None, None))
            if p is None:
                p = {name: jax.lax.dynamic_index_in_dim(w, i, keepdims=False) for name, w in stacked.items()}
            x = L.rms_norm(h, p["attn_norm"], cfg.rms_norm_eps)
            q = proj("wq", "btd,dhe->bthe", x, p)
            k = proj("wk", "btd,dhe->bthe", x, p)
            v = proj("wv", "btd,dhe->bthe", x, p)
            if cfg.qkv_bias:
                q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
            if cfg.qk_norm:
                q = L.rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
                k = L.rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
            q = L.apply_rope(q, positions, inv_freq)
            k = L.apply_rope(k, positions, inv_freq)
            if cache is not None:  # write this layer's new keys/values in place, attend over all slots
                ck, cv = cache
                if jnp.ndim(write_index) == 1:  # one slot per row (T = 1): the rollout engine's decode step
                    # a per-row update over the leading batch axis: in place, and partitioned row by row
                    # (no collective on a batch-sharded cache)
                    put = jax.vmap(lambda c, x, j: jax.lax.dynamic_update_slice(c, x[None], (i, j, 0, 0)))
                    ck, cv = put(ck, to_cache(k, ck.dtype), write_index), put(cv, to_cache(v, cv.dtype), write_index)
                else:
                    at = (0, i, write_index, 0, 0)
                    ck = jax.lax.dynamic_update_slice(ck, to_cache(k[:, None], ck.dtype), at)
                    cv = jax.lax.dynamic_update_slice(cv, to_cache(v[:, None], cv.dtype), at)
                cache = (ck, cv)
            if cache is not None and decoding:  # read only the filled part of the cache
                o = decode_attention(q, ck, cv, i, q_slots, key_valid)
            else:
                if cache is not None:
                    k = from_cache(jax.lax.dynamic_index_in_dim(ck, i, axis=1, keepdims=False), dt)
                    v = from_cache(jax.lax.dynamic_index_in_dim(cv, i, axis=1, keepdims=False), dt)
                o = attention(q, k, v, q_slots, key_valid, cfg.attention, cfg.attention_block,
                              cached=cache is not None, layout=layout, segments=segments)
            if decoding and "wo_lora_a" not in p:  # heads flattened on both sides: one [B, 1, H*Dh] x [H*Dh, D]
                # product (the einsum made XLA:CPU copy wo transposed at every decode step: 9% of SmolLM2's step)
                h = h + o.reshape(o.shape[:2] + (-1,)) @ p["wo"].reshape(-1, p["wo"].shape[-1])
            else:
                h = h + proj("wo", "bthe,hed->btd", o, p)
            x = L.rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps)
            if cfg.lora_rank:  # SwiGLU with the adapters' terms on gate, up and down
                m = jax.nn.silu(proj("w_gate", "btd,df->btf", x, p)) * proj("w_up", "btd,df->btf", x, p)
                h = h + proj("w_down", "btf,fd->btd", m, p)
            else:
                h = h + L.swiglu(x, p["w_gate"], p["w_up"], p["w_down"])
            return h, cache

        if cache is None and cfg.remat != "none":  # under differentiation: recompute the layer body
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat])
        # a loop with a static trip count: lowered to one scan (one layer body, differentiable);
        # unrolled only under `unrolled_layers()` (the planner: XLA's cost analysis counts a loop body once)
        if layers is not None:
            for i, p in enumerate(layers):
                h, cache = body(i, (h, cache), p)
        else:
            h, cache = jax.lax.fori_loop(0, cfg.num_layers, body, (h, cache),
                                         unroll=cfg.num_layers if _UNROLL.get() else 1)
        h = L.rms_norm(h, self.final_norm[...].astype(dt), cfg.rms_norm_eps)
        return h, cache


REMAT_POLICIES = {"full": None,  # keep nothing but the layer inputs
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}  # keep matmul outputs


def with_runtime(model: Transformer, *, attention: str | None = None, remat: str | None = None,
                 attention_block: int | None = None) -> Transformer:
    """Set the model's runtime choices in place (they are part of its static config) and return it."""
    from opd_jax.errors import OpdError
    from opd_jax.models.attention import IMPLEMENTATIONS

    kw = {k: v for k, v in dict(attention=attention, remat=remat, attention_block=attention_block).items()
          if v is not None}
    if kw.get("attention", "auto") not in IMPLEMENTATIONS:
        raise OpdError(f"attention must be one of {', '.join(IMPLEMENTATIONS)}, got {kw['attention']!r}")
    if kw.get("remat", "none") not in ("none", *REMAT_POLICIES):
        raise OpdError(f"train.remat must be one of full, dots, none; got {kw['remat']!r}")
    model.cfg = model.cfg.replace(**kw)
    return model


_LAYOUT = contextvars.ContextVar("opd_jax_activation_layout", default=None)


@contextlib.contextmanager
def activation_layout(fn):
    """Trace the model with `fn(x, logical_axes)` applied to the residual stream at every layer (a
    sharding constraint from the rules table, set by the jitted step on a mesh). Without it, XLA may
    keep whole-batch activations on every device and split the FSDP weights' contracting dimension.
    `fn=None` traces without constraints (no mesh)."""
    token = _LAYOUT.set(fn)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


_UNROLL = contextvars.ContextVar("opd_jax_unroll_layers", default=False)


@contextlib.contextmanager
def unrolled_layers():
    """Trace the layer loop fully unrolled (for FLOP counting; same numbers, bigger program)."""
    token = _UNROLL.set(True)
    try:
        yield
    finally:
        _UNROLL.reset(token)


def unrolling() -> bool:
    """Whether loops are being traced unrolled (`unrolled_layers`): the planner's FLOP count, which XLA's
    cost analysis takes per loop body."""
    return _UNROLL.get()


def segment_positions(segments):
    """Each token's position within its segment, for rows of contiguous segments [R, L] -> [R, L] int32:
    t minus the column where its segment starts (a segment starts where the id changes)."""
    t = jnp.arange(segments.shape[-1])
    change = jnp.concatenate([jnp.ones_like(segments[..., :1], bool), segments[..., 1:] != segments[..., :-1]], -1)
    return (t - jax.lax.cummax(jnp.where(change, t, 0), axis=segments.ndim - 1)).astype(jnp.int32)


def positions_from_mask(mask):
    """RoPE positions [B, T]: index among the row's real tokens (0 on left padding)."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def cache_dtype(cfg: ModelConfig):
    """The KV cache's storage dtype: a 16-bit compute dtype is stored as its uint16 bit pattern (the
    same bytes; a backend that lacks 16-bit float updates, XLA:CPU, would otherwise widen the whole
    cache to float32 around every in-place write), float32 as itself."""
    dt = jnp.dtype(cfg.dtype)
    return jnp.dtype(jnp.uint16) if dt.itemsize == 2 else dt


def init_cache(cfg: ModelConfig, batch: int, length: int):
    """Zeroed KV cache (k, v), each [B, L, S, K, Dh] (rows first: a row's update is one slice, in
    place) in `cache_dtype`; logical axes in `CACHE_AXES`."""
    shape = (batch, cfg.num_layers, length, cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, cache_dtype(cfg)), jnp.zeros(shape, cache_dtype(cfg))


CACHE_AXES = ("batch", "layers", "cache_seq", "kv_heads", "head_dim")


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised model (normal(0, 0.02) matrices, unit norms, zero biases)."""
    return Transformer(cfg, rngs=nnx.Rngs(params=seed))
