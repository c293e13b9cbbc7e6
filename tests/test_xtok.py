"""Cross-tokenizer building blocks (opd_jax/xtok.py, issue 26 in progress): token bytes, byte spans,
shared boundaries and the byte-prefix projection, on two byte-level BPE tokenizers trained here (one
with no merges, a byte-level "character" tokenizer; one that merges digit runs) and hand-built tables."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_jax.xtok import matching_starts, prefix_map, project, retokenize, shared_boundaries, spans, token_bytes

CORPUS = ["12345 + 678 = 7023", "the sum of 4096 and 17 is 4113", "ünïcödé 日本語 text 🙂 too", "  spaces\tand\ttabs  "] * 30


def _bpe(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def pair():
    chars, merged = _bpe(258), _bpe(400)  # 256 bytes + 2 specials: no merges; 142 merges
    return (chars, token_bytes(chars)), (merged, token_bytes(merged))


def test_token_bytes_of_byte_level_and_character_tokenizers(pair):
    (chars, tc), (merged, tm) = pair
    assert tc[chars.convert_tokens_to_ids("<s>")] == b"" and sorted(b for b in tc if b) == [bytes([i]) for i in range(256)]
    assert any(len(b) > 1 and b.strip().isdigit() for b in tm)  # digit runs merged
    from opd_jax.tasks import build_char_tokenizer

    ct = build_char_tokenizer(None)
    table = token_bytes(ct)
    assert table[ct.convert_tokens_to_ids("7")] == b"7" and table[ct.bos_token_id] == b""


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=0, max_size=40))
def test_spans_cover_every_byte_in_order_and_boundaries_are_shared(pair, text):
    (chars, tc), (merged, tm) = pair
    data = text.encode("utf-8")
    out = {}
    for tok, table in ((chars, tc), (merged, tm)):
        ids = tok.encode(text, add_special_tokens=False)
        sp = spans(table, ids)
        assert b"".join(table[i] for i in ids) == data  # the token bytes are the text's bytes
        if len(ids):
            assert sp[0, 0] == 0 and sp[-1, 1] == len(data)
            assert np.all(sp[1:, 0] == sp[:-1, 1]) and np.all(sp[:, 1] >= sp[:, 0])  # monotone, no gap
        out[tok] = sp
    starts = matching_starts(out[merged], out[chars])  # every merged token starts where a byte does
    keep = out[merged][:, 1] > out[merged][:, 0]
    assert np.all(starts[keep] >= 0) and np.all(np.diff(starts[keep]) > 0)
    np.testing.assert_array_equal(out[chars][starts[keep], 0], out[merged][keep, 0])
    back = matching_starts(out[chars], out[merged])  # a byte starts a merged token only at its boundaries
    assert set(out[chars][back >= 0, 0]) == set(out[merged][keep, 0])
    assert retokenize(merged, data) == merged.encode(text, add_special_tokens=False)
    shared = shared_boundaries(out[chars], out[merged])
    assert np.all(np.diff(shared) > 0)
    assert set(shared) <= set(out[chars][:, 1]) & set(out[merged][:, 1])
    if data:
        assert shared[-1] == len(data)  # both end where the text ends
    # the character tokenizer ends a token at every byte: every boundary of the other is shared
    assert set(shared) == set(out[merged][:, 1][out[merged][:, 1] > out[merged][:, 0]])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_projection_keeps_all_the_mass(pair, seed):
    (chars, tc), (merged, tm) = pair
    q = np.random.RandomState(seed).dirichlet(np.full(len(tm), 0.3), size=3)
    pmap = prefix_map(tm, tc)  # merged teacher onto the byte-level student: every token maps (its first byte)
    proj = project(q, pmap, len(tc))
    np.testing.assert_allclose(proj.sum(-1), 1.0, rtol=1e-12)
    assert np.all(proj >= 0)
    specials = [merged.convert_tokens_to_ids(t) for t in ("<s>", "</s>")]
    np.testing.assert_allclose(proj[:, -1], q[:, specials].sum(-1), rtol=1e-12)  # only specials are residual


def test_known_answer_projection_by_hand():
    student = [b"", b"1", b"12", b"3"]
    teacher = [b"", b"123", b"12", b"4", b"1"]
    pmap = prefix_map(teacher, student)
    assert pmap.tolist() == [-1, 2, 2, -1, 1]  # "123" -> "12" (the longest prefix), "4": none
    q = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    np.testing.assert_allclose(project(q, pmap, 4), [0.0, 0.25, 0.5, 0.0, 0.25])  # residual 0.1 + 0.15


def test_bytes_a_tokenizer_cannot_give_back_are_reported_not_misaligned(pair):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    (_, _), (merged, _) = pair
    assert retokenize(merged, "é".encode("utf-8")[:1]) is None  # a multi-byte character cut in half
    lower = Tokenizer(models.WordLevel({c: i for i, c in enumerate("<abc")}, unk_token="<"))
    lower.normalizer = normalizers.Lowercase()
    lower.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    lower = PreTrainedTokenizerFast(tokenizer_object=lower, unk_token="<")
    assert retokenize(lower, b"abc") is not None and retokenize(lower, b"aBc") is None  # normalised: refused
