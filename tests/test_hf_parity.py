"""Logits and greedy decoding match transformers' own torch models, for every supported family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import opd_jax
from conftest import FAMILIES


def _left_padded_batch(vocab=128, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, size=(3, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    ids = np.where(mask == 1, ids, 0)
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_left_padded(hf_checkpoints, family):
    folder, torch_model = hf_checkpoints[family]
    model = opd_jax.load_model(folder, dtype="float32")
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert out.shape == ref.shape == (3, 12, 128)
    real = mask.astype(bool)
    assert np.abs(out - ref)[real].max() < 1e-4
    assert np.abs(ref[real]).max() > 0.5  # the comparison is not between near-zero arrays


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers_generate(hf_checkpoints, family):
    folder, torch_model = hf_checkpoints[family]
    model = opd_jax.load_model(folder)
    ids, mask = _left_padded_batch(seed=1)
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                   max_new_tokens=16, min_new_tokens=16, eos_token_id=None, pad_token_id=0)
    for slots in (None, 2):  # one slot per row, and two slots with the third row refilled into one
        roll = opd_jax.generate(model, jnp.asarray(ids), jnp.asarray(mask), key=jax.random.key(0),
                                max_new_tokens=16, temperature=0.0, eos_id=None, slots=slots, steps_per_call=4)
        np.testing.assert_array_equal(np.asarray(roll.tokens), ref.numpy())
        assert np.asarray(roll.mask).sum() == 3 * 16
    assert len(set(ref.numpy()[:, 12:].ravel().tolist())) > 3  # a non-degenerate continuation


def test_left_padding_gives_same_logits_as_unpadded(hf_checkpoints):
    model = opd_jax.load_model(hf_checkpoints["qwen3"][0])
    ids, mask = _left_padded_batch()
    padded = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    alone = np.asarray(model(jnp.asarray(ids[2:, 9:])))
    np.testing.assert_allclose(padded[2, 9:], alone[0], atol=1e-5)
