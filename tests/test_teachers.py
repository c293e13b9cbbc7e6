"""Teacher scoring: each teacher runs once on exactly its routed rows and hands back what the
estimator needs, in the right rows; checked against plain whole-row forwards of the same models."""

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from opd_jax.layout import RowLayout
from opd_jax.models import ModelConfig, init_model
from opd_jax.teachers import LocalTeacher, Rows, Scored, score_batch

from conftest import TINY

P, N, T = 5, 4, 0.7


def _teacher(name, seed, **shape):
    model = init_model(ModelConfig(**{**yaml.safe_load(TINY), **shape}), seed=seed)
    g, st = nnx.split(model)
    return LocalTeacher(name, g, st, model.cfg.vocab_size, None, model.output_matrix()), model


@pytest.fixture(scope="module")
def setup():
    (ta, ma), (tb, mb) = _teacher("a", 1), _teacher("b", 2, hidden_size=48)
    rows = RowLayout.build(["x", "y", "z"], {"x": "a", "y": "b", "z": "a"}, per_domain=2, group_size=2, lam=1.0)
    B = rows.rows("on")  # 12 rows: x -> 0..3, y -> 4..7, z -> 8..11
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(3, 64, (B, P + N)), jnp.int32)
    pmask = np.ones((B, P), np.int32)
    pmask[::3, :2] = 0  # some left padding
    full = jnp.asarray(np.concatenate([pmask, np.ones((B, N), np.int32)], 1))
    return {"a": ta, "b": tb}, {"a": ma, "b": mb}, rows, tokens, full


def test_hidden_states_go_to_each_teacher_for_its_rows_only(setup, monkeypatch):
    import opd_jax.teachers as T_mod

    teachers, models, rows, tokens, full = setup
    groups = rows.groups(tokens.shape[0])
    assert groups == {"a": [0, 1, 2, 3, 8, 9, 10, 11], "b": [4, 5, 6, 7]}
    calls = []
    forward = T_mod.teacher_forward
    monkeypatch.setattr(T_mod, "teacher_forward", lambda t, tok, *a, **k: (calls.append(t.name), forward(t, tok, *a, **k))[1])
    out = score_batch(teachers, groups, Rows(tokens, full, P), temperature=T, what="hidden").out
    assert sorted(calls) == ["a", "b"]  # each teacher once, on all its rows
    for name, idx in groups.items():
        want = models[name].completion_hidden(tokens[np.array(idx)], full[np.array(idx)], P)
        assert out[name].shape == (len(idx), N, models[name].cfg.hidden_size)
        np.testing.assert_allclose(np.asarray(out[name]), np.asarray(want), atol=1e-5)


def test_sampled_token_logprobs_come_back_in_batch_row_order(setup):
    teachers, models, rows, tokens, full = setup
    got = np.asarray(score_batch(teachers, rows.groups(tokens.shape[0]), Rows(tokens, full, P), temperature=T,
                                 what="logprobs").out)
    for r in range(tokens.shape[0]):
        name = rows.routes[r // 4]
        logits = np.asarray(models[name](tokens[r:r + 1], attention_mask=full[r:r + 1]), np.float64)[0, P - 1:-1] / T
        lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        want = lp[np.arange(N), np.asarray(tokens[r, P:])]
        np.testing.assert_allclose(got[r], want, atol=2e-5, err_msg=f"row {r} ({name})")


class _Fake:
    """A Teacher of the protocol that scores row r, position j with 100 * (first token of the row) + j,
    covers only even positions when `partial`, and records the rows it was given."""

    live = False

    def __init__(self, name, partial=False):
        self.name, self.vocab_size, self.partial, self.seen = name, 64, partial, []

    def score(self, rows, what, *, temperature, topk=0):
        self.seen.append(rows)
        tok = np.asarray(rows.tokens)
        n = tok.shape[1] - rows.prompt_len
        out = 100.0 * tok[:, :1] + np.arange(n)[None]
        keep = np.tile(np.arange(n) % 2 == 0, (tok.shape[0], 1)).astype(np.int32) if self.partial else None
        return Scored(jnp.asarray(out, jnp.float32), keep, {"tokens": float(tok.shape[0])})

    def output_matrix(self):
        return None

    def metrics(self):
        return {}


def test_score_batch_puts_rows_back_in_order_and_merges_what_teachers_cover(setup):
    """Any Teacher: rows routed by groups, outputs back in batch row order, the covered positions merged
    into one loss mask (the completion mask times each teacher's keep), statistics summed."""
    _, _, rows, tokens, full = setup
    full = np.asarray(full).copy()
    full[0, P + 2:] = 0  # row 0 ends early: not in the loss mask whatever the teacher covers
    teachers = {"a": _Fake("a"), "b": _Fake("b", partial=True)}
    groups = rows.groups(tokens.shape[0])
    s = score_batch(teachers, groups, Rows(tokens, jnp.asarray(full), P, examples=list(range(12))),
                    temperature=T, what="logprobs")
    want = 100.0 * np.asarray(tokens)[:, :1] + np.arange(N)[None]
    np.testing.assert_array_equal(np.asarray(s.out), want)
    keep = full[:, P:].copy()
    keep[4:8, 1::2] = 0  # b's rows: its odd positions are not covered
    np.testing.assert_array_equal(s.keep, keep)
    assert s.stats == {"tokens": 12.0}
    assert [r.examples for r in teachers["b"].seen] == [[4, 5, 6, 7]]  # each teacher sees its own rows' examples
    np.testing.assert_array_equal(np.asarray(teachers["a"].seen[0].tokens), np.asarray(tokens)[[0, 1, 2, 3, 8, 9, 10, 11]])
    assert score_batch({"a": _Fake("a"), "b": _Fake("b")}, groups, Rows(tokens, jnp.asarray(full), P), temperature=T,
                       what="logprobs").keep is None


def test_privileged_teacher_reads_its_template_then_the_same_completion():
    """A privileged teacher's rows: its template filled with each row's prompt (and answer), encoded to
    its own prompt length, then the student's completion tokens unchanged (checked by decoding)."""
    from opd_jax.tasks import Example, Prompter
    from opd_jax.teachers import Privileged
    from opd_jax.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(None)
    prompter = Prompter(tok)
    inner = _Fake("p")
    t = Privileged(inner, "answer", "answer: {answer}. {prompt}", prompter, 24)
    exs = [Example("1+2=", "3", "addition"), Example("40+2=", "42", "addition")]
    ids, pm = prompter.encode(exs, 8)
    comp = np.asarray([tok.encode("3", add_special_tokens=False) + [0] * 2,
                       tok.encode("42", add_special_tokens=False) + [0]])
    cmask = (comp > 0).astype(np.int32)
    rows = Rows(jnp.asarray(np.concatenate([ids, comp], 1)), jnp.asarray(np.concatenate([pm, cmask], 1)), 8, exs)
    t.score(rows, "logprobs", temperature=1.0)
    seen = inner.seen[0]
    assert seen.prompt_len == 24 and seen.tokens.shape == (2, 24 + 3)
    got = np.asarray(seen.tokens)
    for r, ex in enumerate(exs):
        shown = got[r, :24][np.asarray(seen.full_mask)[r, :24] > 0]
        assert tok.decode(shown.tolist(), skip_special_tokens=True) == f"answer: {ex.answer}. {ex.prompt}"
    np.testing.assert_array_equal(got[:, 24:], comp)
    with pytest.raises(Exception, match="privileged \\(answer\\) but a 'addition' row has no answer"):
        t.score(rows._replace(examples=[Example("1+2=", None, "addition")] * 2), "logprobs", temperature=1.0)
