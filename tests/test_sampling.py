"""The sampler: log-probs against torch, EOS handling, determinism, compile count, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import opd_jax
from opd_jax import engine, sampling
from opd_jax.models import ModelConfig, init_model
from opd_jax.sharding import make_mesh, shard_model
from references import left_padded_prompts


def _prompts(seed=0, b=4, p=7, vocab=128):
    """Left-padded prompts with 2 to p real tokens, as device arrays."""
    ids, mask = left_padded_prompts(seed, b, p, vocab, min_real=2)
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("new,slots", [(10, None), (240, None), (10, 3)])  # 240: the cache outgrows the first
def test_sampled_logprobs_match_a_torch_forward_over_the_rollout(hf_checkpoints, new, slots):  # read lengths
    """Decode steps read only the filled part of the cache (a length chosen on device per step); the
    log-probs still equal transformers' forward over the whole rollout."""
    from opd_jax.models.attention import cache_buckets

    folder, torch_model = hf_checkpoints["qwen3"]
    model = opd_jax.load_model(folder)
    ids, mask = _prompts()
    assert len(cache_buckets(ids.shape[1] + new)) == (1 if new == 10 else 2)
    temp = 0.7
    roll = opd_jax.generate(model, ids, mask, key=jax.random.key(3), max_new_tokens=new, temperature=temp,
                            eos_id=[5, 9], slots=slots)  # 3 slots: rows ended by a stop id are refilled
    full_mask = np.concatenate([np.asarray(mask), np.asarray(roll.mask)], 1)
    with torch.no_grad():
        logits = torch_model(torch.tensor(np.asarray(roll.tokens)), attention_mask=torch.tensor(full_mask)).logits
    logp = torch.log_softmax(logits / temp, -1).numpy()
    p = ids.shape[1]
    new = np.asarray(roll.tokens)[:, p:]
    ref = np.take_along_axis(logp[:, p - 1:-1], new[..., None], -1)[..., 0]
    m = np.asarray(roll.mask)
    np.testing.assert_allclose(np.asarray(roll.logprobs) * m, ref * m, atol=1e-4)


def test_cache_read_lengths():
    from opd_jax.models.attention import cache_buckets

    assert cache_buckets(100) == (100,) and cache_buckets(300) == (128, 256, 300)
    big = cache_buckets(8192 + 512)
    assert big[-1] == 8704 and len(big) <= 17 and all(b - a == big[0] for a, b in zip(big, big[1:-1]))


@pytest.mark.parametrize("stop,pad", [(5, 0), ([5, 9], 9)], ids=["one-eos", "two-stop-ids-pad-is-one"])
def test_eos_ends_a_row_and_the_mask_includes_it(stop, pad):
    """A row ends after the first of its stop ids (that token counts in the mask); the rest is padding.
    With two stop ids and the pad id one of them (Qwen's <|endoftext|>), rows end at either."""
    model = init_model(ModelConfig.for_family("llama", vocab_size=16), seed=0)
    ids, mask = _prompts(vocab=16, b=64)
    stops = np.atleast_1d(stop)
    roll = opd_jax.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=12, temperature=1.0,
                            eos_id=stop, pad_id=pad)
    new, m = np.asarray(roll.tokens)[:, 7:], np.asarray(roll.mask)
    finished, by = 0, set()
    for row in range(64):
        hits = np.flatnonzero(np.isin(new[row], stops))
        end = hits[0] + 1 if hits.size else 12
        finished += bool(hits.size)
        if hits.size:
            by.add(int(new[row, hits[0]]))
        assert m[row, :end].all() and not m[row, end:].any()
        assert (new[row, end:] == pad).all()
        assert (np.asarray(roll.logprobs)[row, end:] == 0).all()
    assert 5 < finished < 64  # the test exercises both finished and unfinished rows
    assert by == set(stops.tolist())  # every stop id ended some row


def test_loop_stops_when_every_row_is_done():
    model = init_model(ModelConfig.for_family("qwen2", vocab_size=16))
    model.final_norm[...] = jnp.zeros((64,))  # all logits 0: greedy picks token 0 at every step
    ids, mask = _prompts(vocab=16)
    roll = opd_jax.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=8, temperature=0.0,
                            eos_id=0, pad_id=9)
    assert int(roll.steps) == 1
    np.testing.assert_array_equal(np.asarray(roll.mask), [[1] + [0] * 7] * 4)
    np.testing.assert_array_equal(np.asarray(roll.tokens)[:, 7:], [[0] + [9] * 7] * 4)
    longer = opd_jax.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=8, temperature=0.0,
                              eos_id=None)
    assert int(longer.steps) == 8 and np.asarray(longer.mask).all()


def test_deterministic_for_a_key_and_compiled_once():
    model = init_model(ModelConfig.for_family("qwen3"), seed=4)
    ids, mask = _prompts(vocab=256)
    before = engine.trace_count()
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9, eos_id=2)
    a = opd_jax.generate(model, ids, mask, key=jax.random.key(7), **kw)
    b = opd_jax.generate(model, ids, mask, key=jax.random.key(7), **kw)
    c = opd_jax.generate(model, ids + 0, mask, key=jax.random.key(8), **kw)
    model.embed[...] = model.embed[...] * 1.01  # new parameter values, same shapes
    opd_jax.generate(model, ids, mask, key=jax.random.key(7), **kw)
    assert engine.trace_count() - before == 1
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def _numpy_filter(x, temperature, top_k, top_p):
    x = x / temperature
    out = np.full_like(x, -np.inf)
    for r, row in enumerate(x):
        order = np.argsort(-row, kind="stable")
        keep = order[:top_k] if top_k else order
        probs = np.exp(row[keep] - row[keep].max())
        probs /= probs.sum()
        n = np.searchsorted(np.cumsum(probs), top_p) + 1 if top_p < 1 else len(keep)
        out[r, keep[:n]] = row[keep[:n]]
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 5, 1.0), (1.3, 0, 0.6), (0.8, 8, 0.7)])
def test_filter_matches_numpy_reference(temperature, top_k, top_p):
    x = np.random.RandomState(0).normal(size=(5, 40)).astype(np.float32) * 2
    got = np.asarray(sampling.filter_logits(jnp.asarray(x), temperature, top_k, top_p))
    ref = _numpy_filter(x, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[~np.isinf(got)], ref[~np.isinf(ref)], rtol=1e-6)


def test_sample_frequencies_follow_the_filtered_distribution():
    logits = jnp.asarray(np.random.RandomState(1).normal(size=(1, 12)).astype(np.float32))
    n = 20000
    toks, lps = sampling.sample_token(jnp.repeat(logits, n, 0), jax.random.key(0), 0.8, 6, 0.95)
    ref = np.exp(_numpy_filter(np.asarray(logits), 0.8, 6, 0.95)[0])
    ref /= ref.sum()
    freq = np.bincount(np.asarray(toks), minlength=12) / n
    assert np.abs(freq - ref).max() < 4 * np.sqrt(0.25 / n)
    np.testing.assert_allclose(np.exp(np.asarray(lps)), ref[np.asarray(toks)], rtol=1e-5)


def test_top_k_one_is_greedy():
    model = init_model(ModelConfig.for_family("llama"), seed=5)
    ids, mask = _prompts(vocab=256)
    g = opd_jax.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=5, temperature=0.0)
    k1 = opd_jax.generate(model, ids, mask, key=jax.random.key(1), max_new_tokens=5, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(np.asarray(g.tokens), np.asarray(k1.tokens))
    np.testing.assert_allclose(np.asarray(k1.logprobs), 0.0, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4), (8, 1, 1)])
def test_sharded_parameters_give_the_same_tokens(mesh_shape):
    cfg = ModelConfig.for_family("qwen3", num_heads=8, num_kv_heads=4, vocab_size=256)
    ids, mask = _prompts(vocab=256, b=8)
    kw = dict(key=jax.random.key(11), max_new_tokens=8, temperature=1.0, eos_id=3)
    ref = opd_jax.generate(init_model(cfg, seed=6), ids, mask, **kw)
    mesh = make_mesh(mesh_shape)
    model = shard_model(init_model(cfg, seed=6), mesh)
    assert len(model.layers.w_up[...].sharding.device_set) == 8
    got = opd_jax.generate(model, ids, mask, mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=1e-4)


def test_overlong_prompt_is_a_clear_error():
    model = init_model(ModelConfig.for_family("qwen3", max_position_embeddings=16))
    ids, mask = _prompts(vocab=256, p=12)
    with pytest.raises(opd_jax.OpdError, match="exceeds the model context 16"):
        opd_jax.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=8)


def test_first_argmax_and_draw_match_numpy_and_jax_random():
    """`first_argmax` gives numpy's argmax (the first of equal maxima, the first NaN), and `draw` the
    token `jax.random.categorical` draws with the same key, row by row and over a batch."""
    from opd_jax.sampling import draw, first_argmax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 300)).astype(np.float32)
    x[1, [7, 40, 299]] = 9.0  # ties: the first wins
    x[2, [150, 20]] = np.nan  # a NaN counts as the largest: the first NaN wins
    x[3, :] = -np.inf
    x[4, :] = 2.5
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, -1))
    assert np.asarray(first_argmax(jnp.asarray(x[1]))) == 7
    y = jnp.asarray(rng.normal(size=(16, 50)).astype(np.float32))
    keys = jax.random.split(jax.random.key(3), 16)
    want = jax.vmap(jax.random.categorical)(keys, y)
    np.testing.assert_array_equal(np.asarray(jax.vmap(draw)(keys, y)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(draw(keys[0], y)), np.asarray(jax.random.categorical(keys[0], y)))
