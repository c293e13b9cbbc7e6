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


# ------------------------------------------------------------------ the loss and the alignment (issue 26)

def test_cross_tokenizer_loss_by_hand():
    """Hand-built vocabularies and a teacher whose distribution is given: bpm's KL and uld's two terms
    computed by hand equal xtok_divergence_loss (teacher logits passed as hidden states with an identity
    output matrix, so q is exactly softmax of them)."""
    import jax.numpy as jnp

    from opd_jax.losses.xtok import EMPTY_LOGPROB, xtok_divergence_loss

    # student vocabulary: "" (EOS), "1", "12", "3"; teacher: "" (EOS), "123", "12", "4", "1"
    bpm = np.array([0, 2, 2, -1, 1], np.int32)  # EOS->EOS, "123"->"12", "12"->"12", "4": residual, "1"->"1"
    uld = np.array([0, -1, 2, -1, 1], np.int32)  # identical bytes only
    q = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    p = np.array([0.4, 0.3, 0.2, 0.1])
    h_s = jnp.asarray(np.log(p)[None, None], jnp.float32)  # logits = log p with an identity output matrix
    h_t = jnp.asarray(np.log(q)[None, None], jnp.float32)
    one = jnp.ones((1, 1), jnp.int32)

    def loss(vmap, how, kind):
        return float(xtok_divergence_loss(h_s, jnp.eye(4), h_t, jnp.eye(5), jnp.asarray(vmap), one, how, kind)[0])

    # bpm: EOS 0.1, "1" 0.25, "12" 0.2 + 0.3, "3" nothing (eps), residual 0.15 dropped; renormalised
    qt = np.array([0.1, 0.25, 0.5, np.exp(EMPTY_LOGPROB)])
    qt = qt / qt.sum()
    np.testing.assert_allclose(loss(bpm, "bpm", "reverse_kl"), np.sum(p * np.log(p / qt)), rtol=1e-5)
    np.testing.assert_allclose(loss(bpm, "bpm", "forward_kl"), np.sum(qt * np.log(qt / p)), rtol=1e-5)
    # uld: matched pairs EOS, "12", "1" (student "3" and teacher "123", "4" unmatched)
    pm, qm = p[[0, 1, 2]] / p[[0, 1, 2]].sum(), q[[0, 4, 2]] / q[[0, 4, 2]].sum()
    l1 = abs(0.1 - 0.2) + abs(0.0 - 0.15)  # sorted unmatched: student (0.1), teacher (0.2, 0.15)
    np.testing.assert_allclose(loss(uld, "uld", "reverse_kl"), np.sum(pm * np.log(pm / qm)) + l1, rtol=1e-5)


def test_cross_tokenizer_loss_with_one_tokenizer_is_the_same_tokenizer_loss():
    """With the identity map, bpm and uld equal the chunked same-tokenizer divergence in value and
    gradient, for several f-divergences, and bpm's top-k equals the same-tokenizer top-k loss."""
    import jax
    import jax.numpy as jnp

    from opd_jax.losses.chunked import chunked_divergence_loss, chunked_topk_loss
    from opd_jax.losses.xtok import xtok_divergence_loss

    k = jax.random.split(jax.random.key(3), 5)
    h, w = jax.random.normal(k[0], (3, 7, 8)), jax.random.normal(k[1], (8, 11))
    th, tw = jax.random.normal(k[2], (3, 7, 6)), jax.random.normal(k[3], (6, 11))
    mask = (jax.random.uniform(k[4], (3, 7)) > 0.3).astype(jnp.int32)
    ident = jnp.arange(11, dtype=jnp.int32)
    for kind in ("reverse_kl", "forward_kl", "jsd", "tv"):
        ref, g_ref = jax.value_and_grad(lambda x: chunked_divergence_loss(
            x, w, mask, kind, teacher_hidden=th, teacher_w=tw, seq_chunk=3)[0])(h)
        for how in ("bpm", "uld"):
            got, g = jax.value_and_grad(lambda x: xtok_divergence_loss(x, w, th, tw, ident, mask, how, kind,
                                                                       seq_chunk=3)[0])(h)
            np.testing.assert_allclose(float(got), float(ref), rtol=1e-5, err_msg=f"{how} {kind}")
            np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-6, err_msg=f"{how} {kind}")
    ref = chunked_topk_loss(h, w, th, tw, mask, 3, "reverse_kl", seq_chunk=3)[0]
    got = xtok_divergence_loss(h, w, th, tw, ident, mask, "bpm", "reverse_kl", seq_chunk=3, topk=3)[0]
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_projected_log_probabilities_sum_to_one(pair, seed):
    """bpm's projection of any teacher distribution, through the real map between the two tokenizers
    (both directions), is a distribution over the student vocabulary."""
    import jax.numpy as jnp

    from opd_jax.losses.xtok import project_logprobs
    from opd_jax.xtok import vocab_map

    (chars, tc), (merged, tm) = pair
    rng = np.random.RandomState(seed)
    for t_tok, s_tok in ((merged, chars), (chars, merged)):
        vmap = vocab_map(t_tok, s_tok, "bpm", teacher_vocab=len(t_tok) + 3)  # 3 padded embedding rows
        lq = np.log(rng.dirichlet(np.full(len(t_tok) + 3, 0.2), size=4))
        lqs, residual, _ = project_logprobs(jnp.asarray(lq, jnp.float32), jnp.asarray(vmap), len(s_tok))
        np.testing.assert_allclose(np.exp(np.asarray(lqs, np.float64)).sum(-1), 1.0, rtol=1e-5)
        assert np.all((np.asarray(residual) >= 0) & (np.asarray(residual) <= 1 + 1e-6))


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(min_size=0, max_size=24), min_size=1, max_size=4), stop=st.lists(st.booleans(), min_size=4,
                                                                                                max_size=4),
       m_len=st.integers(1, 40))
def test_alignment_is_monotone_covers_the_bytes_and_keeps_the_segment_sums(pair, texts, stop, m_len):
    """Student completions (some ending in EOS) in one BPE tokenizer aligned for the other, both ways:
    every aligned pair starts at the same byte, aligned teacher indices increase, a row the teacher
    scores whole has all its tokens in a segment, and summing any per-teacher-token values by segment
    gives, over the student tokens, the sum over the teacher tokens kept."""
    from opd_jax.xtok import align_rows

    (chars, c_tab), (merged, m_tab) = pair
    for s_tok, sm, t_tok, tc in ((merged, m_tab, chars, c_tab), (chars, c_tab, merged, m_tab)):
        eos_s, n = s_tok.eos_token_id, 30
        rows = [s_tok.encode(t, add_special_tokens=False)[:n - 1] + ([eos_s] if s else []) for t, s in zip(texts, stop)]
        comp = np.zeros((len(rows), n), np.int64)
        cmask = np.zeros((len(rows), n), np.int64)
        for r, ids in enumerate(rows):
            comp[r, :len(ids)], cmask[r, :len(ids)] = ids, 1
        al = align_rows(comp, cmask, sm, (eos_s,), t_tok, tc, m_len)
        def text_bytes(ids):  # the longest prefix of the row's bytes that is UTF-8: what the teacher can see
            data = b"".join(sm[i] for i in ids)
            try:
                data.decode("utf-8")
                return data, False
            except UnicodeDecodeError as e:
                return data[:e.start], True
        values = np.random.RandomState(0).randn(*al.tokens.shape) * al.mask
        per_student = np.zeros((len(rows), n + 1))
        np.add.at(per_student, (np.arange(len(rows))[:, None], al.segment), values)
        assert al.dropped == 0  # the byte-level tokenizer gives back every text
        assert al.partial == sum(text_bytes(ids)[1] for ids in rows)  # a row cut inside a character is cut there
        for r, ids in enumerate(rows):
            seen, cut = text_bytes(ids)
            body = [i for i in ids if i != eos_s]
            s_sp = spans(sm, body)
            t_ids = al.tokens[r, al.mask[r] > 0].tolist()
            t_body = [i for i in t_ids if i != t_tok.eos_token_id]
            t_sp = spans(tc, t_body)
            assert b"".join(tc[i] for i in t_body) == seen[:t_sp[-1, 1] if len(t_sp) else 0]
            hit = np.flatnonzero(al.aligned[r, :len(body)])
            np.testing.assert_array_equal(t_sp[al.gather[r, hit], 0], s_sp[hit, 0])  # same start byte
            assert np.all(np.diff(al.gather[r, hit]) > 0)  # monotone
            assert not np.any(al.aligned[r, :len(body)][s_sp[:, 0] >= len(seen)])  # nothing past the cut
            scored = t_sp[-1, 1] if len(t_sp) else 0  # a token with bytes the teacher did not score is not whole
            assert not np.any(al.whole[r, :len(body)][s_sp[:, 1] > scored])
            if not cut and (len(t_ids) == len(t_body) + 1 or (len(t_body) < m_len and not stop[r])):  # nothing cut
                assert np.all(al.whole[r, :len(ids)] == 1)
                # every teacher token's value lands on a student token of the row, and a segment's last one
                assert per_student[r, n] == 0 and np.all(per_student[r, len(ids):n] == 0)
                np.testing.assert_allclose(per_student[r, :len(ids)].sum(), values[r].sum(), atol=1e-9)
                # by hand: a teacher token's value goes to the student token ending at the first shared
                # boundary at or after its end; the EOS's to the student's EOS
                ends = sorted(set(s_sp[:, 1][s_sp[:, 1] > s_sp[:, 0]]) & set(t_sp[:, 1]))
                expected = np.zeros(n)
                for j, (_, b) in enumerate(t_sp):
                    e = min(x for x in ends if x >= b)
                    expected[next(i for i, (a2, b2) in enumerate(s_sp) if b2 == e and b2 > a2)] += values[r, j]
                if len(t_ids) > len(t_body):
                    expected[len(body)] += values[r, len(t_body)]
                np.testing.assert_allclose(per_student[r, :n], expected, atol=1e-9)
            if stop[r] and not cut and len(t_ids) == len(t_body) + 1:  # both EOS present: aligned with each other
                assert al.aligned[r, len(body)] == 1 and al.gather[r, len(body)] == len(t_body)


@pytest.fixture(scope="module")
def chat_pair():
    from opd_jax.tiny_chat import build_chat_tokenizer, build_llama_like_tokenizer

    return build_chat_tokenizer(), build_llama_like_tokenizer()


@settings(max_examples=25, deadline=None)
@given(prompt=st.text(min_size=1, max_size=20), answer=st.text(min_size=0, max_size=16), stopped=st.booleans())
def test_the_teacher_sees_its_own_template_and_the_same_text(chat_pair, prompt, answer, stopped):
    """A Qwen-style student (no BOS) and a Llama-style teacher (its template writes a BOS, other special
    tokens, another BPE): the teacher's prompt is its own template around the same user text, with its BOS
    exactly once; its completion is the same bytes in its own tokens (random Unicode, whitespace runs)."""
    from opd_jax.tasks import Prompter
    from opd_jax.tasks.domains import Example
    from opd_jax.xtok import token_bytes, vocab_map
    from opd_jax.xtok_teacher import CrossView

    student, teacher = chat_pair
    stop = (student.eos_token_id,)
    cv = CrossView(teacher, Prompter(teacher, True), token_bytes(teacher), token_bytes(student), stop,
                   vocab_map(teacher, student, "bpm", teacher_vocab=len(teacher), student_stop=stop), 96, 64)
    ex = Example(prompt, answer, "d")
    comp = student.encode(answer, add_special_tokens=False)[:31] + ([stop[0]] if stopped else [])
    ids = np.zeros((1, 32), np.int64)
    mask = np.zeros((1, 32), np.int64)
    ids[0, :len(comp)], mask[0, :len(comp)] = comp, 1
    tokens, fmask, al = cv.view([ex], ids, mask)
    shown = teacher.decode(tokens[0, :96][fmask[0, :96] > 0].tolist())
    assert shown == teacher.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
    assert shown.count(teacher.bos_token) == 1 + prompt.count(teacher.bos_token) and shown.startswith(teacher.bos_token)
    assert student.bos_token is None  # BOS on one side only
    t_comp = tokens[0, 96:][fmask[0, 96:] > 0].tolist()
    body = [i for i in t_comp if i != teacher.eos_token_id]
    seen = b"".join(cv.student_table[i] for i in comp if i not in stop)
    assert b"".join(cv.table[i] for i in body) == seen[:len(b"".join(cv.table[i] for i in body))]
    if al.partial == 0 and len(t_comp) < 64:
        assert b"".join(cv.table[i] for i in body) == seen
        assert (teacher.eos_token_id in t_comp) == stopped
        if stopped:  # the two EOS are aligned
            assert al.aligned[0, len(comp) - 1] == 1 and al.gather[0, len(comp) - 1] == len(body)


def _byte_fallback_tokenizer(merges):
    """A SentencePiece-style BPE (Llama 2 / Mistral / Gemma): "▁" for a space, <0x00>..<0xFF> for every
    byte of a character outside its small vocabulary, built with `tokenizers` here."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + list("abcdefgh0123456789+=:,\u2581"))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=False))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_byte_fallback_tokenizers_align_newlines_accents_and_unknown_characters():
    """<0xNN> pieces are the byte NN: a student and a teacher with different merges give back text with
    newlines, accents and characters neither has (their bytes), and every row aligns whole (before, the
    newline token's bytes were the text "<0x0A>" and such rows were dropped)."""
    from opd_jax.xtok import align_rows, retokenize, token_bytes

    student = _byte_fallback_tokenizer([("a", "b"), ("\u2581", "a"), ("1", "2")])
    teacher = _byte_fallback_tokenizer([("b", "c"), ("c", "d"), ("bc", "d"), ("2", "+")])
    s_tab, t_tab = token_bytes(student), token_bytes(teacher)
    assert s_tab[student.convert_tokens_to_ids("<0x0A>")] == b"\n" and s_tab[student.convert_tokens_to_ids("\u2581a")] == b" a"
    texts = ["abcd\n12+3", "ab é\nà", "c€ 日本 ab", "\n\nbcd a\u00e9"]
    for text in texts:
        for tok, tab in ((student, s_tab), (teacher, t_tab)):
            ids = retokenize(tok, text.encode(), tab)
            assert ids is not None and b"".join(tab[i] for i in ids) == text.encode()
    n, eos = 24, student.eos_token_id
    rows = [student.encode(t, add_special_tokens=False) + [eos] for t in texts]
    comp, cmask = np.zeros((len(rows), n), np.int64), np.zeros((len(rows), n), np.int64)
    for r, ids in enumerate(rows):
        comp[r, :len(ids)], cmask[r, :len(ids)] = ids, 1
    al = align_rows(comp, cmask, s_tab, (eos,), teacher, t_tab, 32)
    assert al.dropped == 0 and al.partial == 0 and al.truncated == 0
    for r, (text, ids) in enumerate(zip(texts, rows)):
        t_ids = al.tokens[r, al.mask[r] > 0].tolist()
        assert t_ids[-1] == teacher.eos_token_id and b"".join(t_tab[i] for i in t_ids[:-1]) == text.encode()
        assert np.all(al.whole[r, :len(ids)] == 1)
        assert al.aligned[r, 0] == 1  # both start a token at byte 0
