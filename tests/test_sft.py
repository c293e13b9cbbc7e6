"""Supervised fine-tuning with injected mistakes (issue 15: teachers robust off their own distribution)."""

import numpy as np

from opd_jax.sft import inject_mistakes


def test_injected_mistakes_change_one_masked_token_and_keep_the_continuation():
    rng = np.random.RandomState(0)
    b, p, n = 200, 5, 9
    tokens = rng.randint(10, 20, (b, p + n)).astype(np.int32)
    lengths = rng.randint(0, n + 1, b)
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
    choices = np.arange(10, 20)
    same_t, same_m = inject_mistakes(tokens, mask, p, 0.0, np.random.RandomState(1), choices)
    assert (same_t == tokens).all() and (same_m == mask).all()
    new_t, new_m = inject_mistakes(tokens, mask, p, 1.0, np.random.RandomState(1), choices)
    assert (new_t[:, :p] == tokens[:, :p]).all()  # prompts untouched
    for r in range(b):
        changed = np.flatnonzero(new_t[r] != tokens[r])
        if lengths[r] < 2:  # nothing before a last token to corrupt
            assert changed.size == 0 and (new_m[r] == mask[r]).all()
            continue
        assert changed.size == 1
        j = changed[0] - p
        assert 0 <= j < lengths[r] - 1 and new_t[r, changed[0]] in choices
        assert new_m[r, j] == 0 and (np.delete(new_m[r], j) == np.delete(mask[r], j)).all()
    half_t, _ = inject_mistakes(tokens, mask, p, 0.5, np.random.RandomState(2), choices)
    eligible = lengths >= 2
    frac = float(((half_t != tokens).any(1) & eligible).sum() / eligible.sum())
    assert 0.35 < frac < 0.65


def test_sft_with_mistakes_trains():
    from opd_jax.models import ModelConfig, init_model
    from opd_jax.sft import sft_train
    from opd_jax.tasks import build_char_tokenizer, get_domain

    tok = build_char_tokenizer(None)
    model = init_model(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=16, max_position_embeddings=64), seed=0)
    dom = get_domain("carry")
    rng = np.random.RandomState(0)
    losses = sft_train(model, tok, lambda s: [(e.prompt, e.answer) for e in (dom.example(rng) for _ in range(8))],
                       steps=4, max_prompt_len=20, max_new_tokens=40, mistake_rate=0.5, warmup=1)
    assert len(losses) == 4 and np.isfinite(losses).all() and losses[-1] < losses[0]
