"""Blockwise (flash-style) attention against the plain reference, in the model and the sampler; remat."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import OpdError
from opd_jax.models.attention import blockwise_attention, naive_attention, resolve, splash_attention
from opd_jax.models.transformer import with_runtime
from opd_jax.engine import generate

from conftest import tiny_model


def _inputs(b, t, s, h, k, d, pad, seed=0):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(b, s, k, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, k, d)), jnp.float32)
    valid = np.ones((b, s), bool)
    for r, n in enumerate(pad):
        valid[r, :n] = False  # left padding
    return q, kk, v, jnp.asarray(valid)


@pytest.mark.parametrize("t,s,h,k,bq,bk,offset", [
    (37, 37, 4, 2, 8, 16, 0),    # GQA, lengths not multiples of either block
    (29, 45, 6, 3, 16, 8, 16),   # prefill-like: queries at slots 16.., keys over a longer cache
    (20, 20, 2, 2, 64, 64, 0),   # one block bigger than the sequence
])
def test_blockwise_equals_naive_in_value_and_gradient(t, s, h, k, bq, bk, offset):
    b, d = 3, 8
    q, kk, v, valid = _inputs(b, t, s, h, k, d, pad=(5, 0, 11))
    slots = jnp.arange(t) + offset
    # queries that see at least one key (left-padded queries see none; no real token reads them)
    real = (valid[:, offset:offset + t] if offset + t <= s else valid[:, :t])[:, :, None, None]
    w = jnp.asarray(np.random.RandomState(1).normal(size=(b, t, h, d)), jnp.float32)

    def loss(fn):
        return lambda q, kk, v: jnp.sum(jnp.where(real, fn(q, kk, v, slots, valid), 0.0) * w)

    naive = naive_attention(q, kk, v, slots, valid)
    block = blockwise_attention(q, kk, v, slots, valid, block_q=bq, block_k=bk)
    np.testing.assert_allclose(np.where(real, block, 0), np.where(real, naive, 0), atol=1e-5)
    g_naive = jax.grad(loss(naive_attention), argnums=(0, 1, 2))(q, kk, v)
    g_block = jax.grad(loss(lambda *a: blockwise_attention(*a, block_q=bq, block_k=bk)), argnums=(0, 1, 2))(q, kk, v)
    for name, a, c in zip("qkv", g_block, g_naive):
        np.testing.assert_allclose(a, c, atol=1e-5, err_msg=name)


def test_blockwise_program_holds_no_t_by_s_scores():
    """Forward and backward at T = S = 384 with 64-wide blocks: no buffer in the compiled program has
    a 384 x 384 pair of dimensions (the plain path's scores do)."""
    q, kk, v, valid = _inputs(1, 384, 384, 2, 1, 8, pad=(0,))
    slots = jnp.arange(384)

    def hlo(fn):
        f = jax.grad(lambda q, kk, v: jnp.sum(fn(q, kk, v, slots, valid)), argnums=(0, 1, 2))
        return jax.jit(f).lower(q, kk, v).compile().as_text()

    square = re.compile(r"\b384,384\b")
    assert square.search(hlo(naive_attention))  # the check can see a [T, S] buffer
    assert not square.search(hlo(lambda *a: blockwise_attention(*a, block_q=64, block_k=64)))


def test_model_gradient_keeps_no_per_block_pair_arrays_across_the_layer_loop():
    """Through the model (layers under lax.scan, under grad), nothing is kept per (query block, key
    block) pair: no compiled buffer has B * H * T * S or more elements. Such buffers appear when the
    mask-only parts of the blockwise loops are hoisted out of the layer loop (the quadratic term the
    Qwen3 recipe showed at 4k tokens)."""
    b, t, block = 2, 256, 32
    model = _model("blockwise", block=block)
    graphdef, state = nnx.split(model)

    def loss(p, ids, mask):
        return jnp.sum(nnx.merge(graphdef, p)(ids, mask)[..., 0])

    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    text = jax.jit(jax.grad(loss)).lower(state, ids, ids).compile().as_text()
    quadratic = b * model.cfg.num_heads * t * t
    sizes = [np.prod([int(d) for d in m.split(",")]) for m in re.findall(r"\b(?:f32|pred|s32)\[([\d,]+)\]", text)]
    assert max(sizes) < quadratic


def _model(attention="naive", remat="none", block=8, seed=0):
    return with_runtime(tiny_model(seed, family="qwen3", num_heads=4, num_kv_heads=2, max_position_embeddings=4096),
                        attention=attention, remat=remat, attention_block=block)


def test_model_logits_and_sampling_unchanged_with_blockwise_attention():
    ids = np.random.RandomState(3).randint(3, 64, (3, 21))
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :9] = 0
    naive, block = _model("naive"), _model("blockwise")
    real = mask[..., None].astype(bool)
    np.testing.assert_allclose(np.where(real, block(ids, mask), 0), np.where(real, naive(ids, mask), 0), atol=1e-5)
    kw = dict(key=jax.random.key(7), max_new_tokens=11, temperature=1.0, eos_id=None)
    a, b = generate(naive, ids, mask, **kw), generate(block, ids, mask, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


@pytest.mark.parametrize("attention", ["naive", "blockwise"])
def test_remat_policies_give_the_same_gradients(attention):
    ids = jnp.asarray(np.random.RandomState(4).randint(3, 64, (2, 19)))
    grads = {}
    for remat in ("none", "full", "dots"):
        graphdef, params = nnx.split(_model(attention, remat))
        loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(ids))[..., 5])  # noqa: E731
        grads[remat] = jax.jit(jax.grad(loss))(params)
    for remat in ("full", "dots"):
        for a, b in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_attention_and_remat_choices_are_checked(monkeypatch):
    assert resolve("auto", 1, 10_000) == "naive"  # decode steps stay on the plain path
    assert resolve("auto", 2048, 2048) == "blockwise"  # off TPU
    assert resolve("splash", 2048, 2048) == "splash"
    assert resolve("splash", 2048, 2048, cached=True) == "blockwise"  # prefill over a cache
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve("auto", 2048, 2048) == "splash"  # whole sequences on TPU
    assert resolve("auto", 2048, 2048, head_dim=64) == "blockwise"  # the kernel wants Dh % 128 == 0
    assert resolve("auto", 512, 4096, cached=True) == "blockwise"
    assert resolve("auto", 1, 4096, cached=True) == "naive"
    with pytest.raises(OpdError, match="attention must be one of"):
        _model("flash2")
    with pytest.raises(OpdError, match="train.remat must be one of"):
        _model("naive", "some")


@pytest.mark.slow
def test_splash_kernel_in_pallas_interpret_mode_equals_naive():
    """The Pallas splash kernel (run by Pallas' interpreter on CPU): value and gradient equal the plain
    path at every real query, with left padding, GQA and a length that is not a multiple of 128."""
    q, kk, v, valid = _inputs(2, 40, 40, 4, 2, 16, pad=(0, 7), seed=5)
    slots = jnp.arange(40)
    real = np.asarray(valid)[:, :, None, None]
    w = jnp.asarray(np.random.RandomState(6).normal(size=q.shape), jnp.float32) * real

    def loss(fn):
        return lambda q, kk, v: jnp.sum(fn(q, kk, v) * w)

    ref_fn = lambda q, kk, v: naive_attention(q, kk, v, slots, valid)  # noqa: E731
    got_fn = lambda q, kk, v: splash_attention(q, kk, v, valid, interpret=True)  # noqa: E731
    np.testing.assert_allclose(np.where(real, got_fn(q, kk, v), 0), np.where(real, ref_fn(q, kk, v), 0), atol=1e-5)
    ref_g = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, kk, v)
    got_g = jax.grad(loss(got_fn), argnums=(0, 1, 2))(q, kk, v)
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.slow
def test_splash_model_on_a_mesh_runs_the_kernel_per_device_and_equals_naive():
    """attention=splash through the model on an 8-device mesh: the kernel runs under shard_map over the
    batch axes (rows split, no all-gather of the batch), and the logits equal the plain path's."""
    from opd_jax.sharding import layout_fn, make_mesh
    from opd_jax.models.transformer import activation_layout

    mesh = make_mesh((1, 8, 1))
    ids = np.random.RandomState(7).randint(3, 64, (8, 24))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    naive, splash = _model("naive"), _model("splash")
    graphdef, state = nnx.split(splash)

    @jax.jit
    def fwd(state, ids, mask):
        with activation_layout(layout_fn(mesh)):
            return nnx.merge(graphdef, state)(ids, mask)

    text = fwd.lower(state, ids, mask).as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text  # the kernel runs per device
    real = mask[..., None].astype(bool)
    np.testing.assert_allclose(np.where(real, fwd(state, ids, mask), 0), np.where(real, naive(ids, mask), 0),
                               atol=1e-5)
