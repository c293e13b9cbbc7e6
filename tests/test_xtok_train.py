"""Cross-tokenizer distillation through the trainer (loss.cross_tokenizer, opd_jax/xtok_teacher.py):
with one tokenizer on both sides it is same-tokenizer distillation (loss and gradient); with a BPE
teacher and the character student, the loss equals a reference built from direct forwards of both
models, token strings and a brute-force prefix search; bad input is refused in one line or counted."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from opd_jax.config import load_config
from opd_jax.errors import OpdError
from opd_jax.losses.xtok import EMPTY_LOGPROB
from opd_jax.models import load_model
from opd_jax.run import build_run
from opd_jax.sampling import Rollout
from opd_jax.tasks import build_char_tokenizer
from opd_jax.tasks.domains import DOMAINS
from opd_jax.tasks.tokenizer import build_bpe_tokenizer
from opd_jax.train_step import part_value_and_grad
from opd_jax.xtok_teacher import check_xtok

from conftest import TINY, tiny_model, tiny_overrides

CHAR_V = len(build_char_tokenizer(None))


def _model(folder, vocab, seed, scale=1.0):
    """A tiny random model saved to `folder`; scale > 1 multiplies its matrices (sharper next-token
    distributions that change from position to position, so a misaligned position shows)."""
    return tiny_model(seed, scale=scale, folder=folder, vocab_size=vocab)


def _cfg(out, teacher, teacher_keys="", **extra):
    init = yaml.safe_load(TINY)
    init["vocab_size"] = CHAR_V  # every id is a character or a special token: no id without bytes
    return load_config(None, tiny_overrides(out, **{"student.init": yaml.safe_dump(init, default_flow_style=True).strip(),
                                                   "teachers": f"[{{name: t, path: {teacher}{teacher_keys}}}]",
                                                   "routing": "{addition: t, reverse: t, sort: t}", **extra}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xtok")
    same = _model(tmp / "same", CHAR_V, 11)
    build_char_tokenizer(same)
    rng = np.random.RandomState(0)
    corpus = [d.example(rng).prompt + d.example(rng).answer for d in DOMAINS.values() for _ in range(300)]
    bpe = _model(tmp / "bpe", 96, 12, scale=8.0)
    build_bpe_tokenizer(bpe, corpus, 96)
    return tmp, same, bpe


def _roll(run, texts, stopped):
    """A hand-made rollout of the step-0 prompts with completions `texts` (character ids), EOS where `stopped`."""
    dc, tok = run.cfg.data, run.tokenizer
    examples = run.source.batch(0, dc.per_domain)
    rep = [ex for ex in examples for _ in range(dc.group_size)]
    ids, pmask = run.prompter.encode(examples, dc.max_prompt_len)
    ids, pmask = np.repeat(ids, dc.group_size, 0), np.repeat(pmask, dc.group_size, 0)
    comp = np.full((len(rep), dc.max_new_tokens), tok.pad_token_id, np.int32)
    mask = np.zeros_like(comp)
    for r, (t, s) in enumerate(zip(texts, stopped)):
        row = tok.encode(t, add_special_tokens=False) + ([run.rollouts.stop[0]] if s else [])
        comp[r, :len(row)], mask[r, :len(row)] = row, 1
    g = run.rollouts._global
    roll = Rollout(g(np.concatenate([ids, comp], 1)), g(np.zeros(comp.shape, np.float32)), g(mask), 0)
    return roll, pmask, rep


def _texts(n, n_new, rng, alphabet="0123456789abc+="):
    lengths = rng.randint(1, n_new, size=n)
    return ["".join(rng.choice(list(alphabet), size=k)) for k in lengths], [bool(i % 2) for i in range(n)]


def _value_and_grad(run, part, lc=None):
    spec = run.spec if lc is None else dataclasses.replace(run.spec, lc=lc)
    tw = run.teacher_w if spec.lc.estimator_type != "sampled" else None
    (loss, m), g = part_value_and_grad(run.graphdef, run.init.params, part, spec, tw)
    return float(loss), jax.tree.map(np.asarray, g)


def test_one_tokenizer_on_both_sides_is_same_tokenizer_distillation(folders):
    tmp, same, _ = folders
    plain = build_run(_cfg(tmp / "plain", same))
    cross = build_run(_cfg(tmp / "cross", same, **{"loss.cross_tokenizer": "bpm"}))
    n = plain.rows.rows("on")
    texts, stopped = _texts(n, plain.cfg.data.max_new_tokens, np.random.RandomState(1))
    parts = []
    for run in (plain, cross):
        roll, pmask, rep = _roll(run, texts, stopped)
        parts.append(run.rollouts.complete(roll, pmask, rep, decode=False)[0])
    np.testing.assert_array_equal(np.asarray(parts[1].loss_mask), np.asarray(parts[1].mask))  # all aligned
    loss0, g0 = _value_and_grad(plain, parts[0])
    for how in ("bpm", "uld"):
        loss1, g1 = _value_and_grad(cross, parts[1], dataclasses.replace(cross.cfg.loss, cross_tokenizer=how))
        np.testing.assert_allclose(loss1, loss0, rtol=1e-5, err_msg=how)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, err_msg=how), g1, g0)
    topk = dataclasses.replace(plain.cfg.loss, estimator_type="topk", topk=4)
    for top_from in ("teacher", "student"):
        loss0, g0 = _value_and_grad(plain, parts[0], dataclasses.replace(topk, topk_from=top_from))
        loss1, g1 = _value_and_grad(cross, parts[1], dataclasses.replace(topk, topk_from=top_from,
                                                                          cross_tokenizer="bpm"))
        np.testing.assert_allclose(loss1, loss0, rtol=1e-5, err_msg=top_from)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, err_msg=top_from), g1, g0)
    # the sampled estimator: the teacher's log-probs, summed per segment, are the same-tokenizer ones
    lps = []
    for run, part in zip((plain, cross), parts):
        lps.append(run.rollouts.score(part.tokens, part.prompt_mask, part.mask, what="logprobs",
                                      examples=[ex for ex in run.source.batch(0, run.cfg.data.per_domain)
                                                for _ in range(run.cfg.data.group_size)]).out)
    m = np.asarray(parts[0].mask) > 0
    np.testing.assert_allclose(np.asarray(lps[1])[m], np.asarray(lps[0])[m], atol=1e-5)
    sampled = dataclasses.replace(plain.cfg.loss, estimator_type="sampled")
    loss0, g0 = _value_and_grad(plain, parts[0]._replace(teacher=lps[0]), sampled)
    loss1, g1 = _value_and_grad(cross, parts[1]._replace(teacher=lps[1]),
                                dataclasses.replace(sampled, cross_tokenizer="bpm"))
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), g1, g0)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_bpm_loss(run, teacher_folder, part, rep, texts, stopped):
    """Forward KL(q~ || pi) averaged over aligned student tokens, from scratch: direct unpadded forwards of
    both models, token strings, the longest student string that prefixes each teacher string (searched
    over the student vocabulary), specials by name and the teacher's EOS onto the student's stop id."""
    s_tok, t_tok = run.tokenizer, run.teachers["t"].cross.tokenizer
    student, teacher = init_student(run), load_model(teacher_folder)
    s_strs = {i: s_tok.decode([i]) for i in range(CHAR_V) if i not in s_tok.all_special_ids}
    stop = run.rollouts.stop[0]
    t_v = teacher.cfg.vocab_size
    target = np.full(t_v, -1)
    for u in range(len(t_tok)):
        if u in t_tok.all_special_ids:
            name = t_tok.convert_ids_to_tokens(u)
            target[u] = stop if u == t_tok.eos_token_id else s_tok.convert_tokens_to_ids(name)
            continue
        text = t_tok.decode([u])
        best = max((s for s in s_strs if text.startswith(s_strs[s])), key=lambda s: len(s_strs[s]), default=-1)
        target[u] = best
    p_len = run.cfg.data.max_prompt_len
    tokens, mask = np.asarray(part.tokens), np.asarray(part.mask)
    total, count = 0.0, 0
    for r, (text, s) in enumerate(zip(texts, stopped)):
        n = int(mask[r].sum())
        s_prompt = [i for i, m in zip(tokens[r, :p_len], np.asarray(part.prompt_mask)[r]) if m]
        lp = _log_softmax(student(jnp.asarray([s_prompt + tokens[r, p_len:p_len + n].tolist()]))[0])[
            len(s_prompt) - 1:-1]
        t_prompt = [t_tok.bos_token_id] + t_tok.encode(rep[r].prompt, add_special_tokens=False)
        t_comp = t_tok.encode(text, add_special_tokens=False)
        if t_tok.decode(t_comp) != text:
            continue  # the teacher cannot give this text back: no position of the row counts
        t_row = t_comp + ([t_tok.eos_token_id] if s else [])
        lq = _log_softmax(teacher(jnp.asarray([t_prompt + t_row]))[0])[len(t_prompt) - 1:-1]
        t_starts = np.cumsum([0] + [len(t_tok.decode([u])) for u in t_comp])[:-1].tolist()
        s_ids = tokens[r, p_len:p_len + len(text)].tolist()
        s_starts = np.cumsum([0] + [len(s_strs[i]) for i in s_ids])[:-1].tolist()
        pairs = [(i, t_starts.index(c)) for i, c in enumerate(s_starts) if c in t_starts]
        if s:
            pairs.append((len(s_ids), len(t_comp)))
        for i, j in pairs:
            q = np.zeros(CHAR_V)
            np.add.at(q, target[target >= 0], np.exp(lq[j])[target >= 0])
            q = np.where(q > 0, q, np.exp(EMPTY_LOGPROB))
            q = q / q.sum()
            total += np.sum(q * (np.log(q) - lp[i]))
            count += 1
    return total / count, count


def init_student(run):
    from flax import nnx

    return nnx.merge(run.graphdef, run.init.params)


def test_a_bpe_teacher_matches_a_reference_built_from_direct_forwards(folders):
    """BPE teacher (merges digit runs and words, alphabet: the tasks' characters), character student:
    the bpm loss equals `_reference_bpm_loss`; a row with a character the teacher's alphabet lacks is
    counted and masked; the sampled hand-over of a row sums to the teacher's log-probability of it."""
    tmp, _, bpe = folders
    run = build_run(_cfg(tmp / "bpe_run", bpe, ", max_new_tokens: 6",
                         **{"loss.cross_tokenizer": "bpm", "loss.kind": "forward_kl"}))
    n = run.rows.rows("on")
    texts, stopped = _texts(n, run.cfg.data.max_new_tokens, np.random.RandomState(2), alphabet="0123456789=")
    texts[0], stopped[0] = "1*2", True  # "*" never occurs in the teacher's corpus
    roll, pmask, rep = _roll(run, texts, stopped)
    part = run.rollouts.complete(roll, pmask, rep, decode=False)[0]
    stats = run.rollouts.score(part.tokens, part.prompt_mask, part.mask, examples=rep).stats
    assert stats["dropped"] == 1 and np.asarray(part.loss_mask)[0].sum() == 0
    ref, count = _reference_bpm_loss(run, bpe, part, rep, texts, stopped)
    assert count == int(np.asarray(part.loss_mask).sum()) > n  # the reference scores the same positions
    loss, _ = _value_and_grad(run, part)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    # sampled: each row's segment sums add up to the teacher's log-probability of its own tokenization
    lp = np.asarray(run.rollouts.score(part.tokens, part.prompt_mask, part.mask, what="logprobs",
                                       examples=rep).out)
    teacher, t_tok = load_model(bpe), run.teachers["t"].cross.tokenizer
    for r in range(1, 4):
        t_prompt = [t_tok.bos_token_id] + t_tok.encode(rep[r].prompt, add_special_tokens=False)
        t_row = t_tok.encode(texts[r], add_special_tokens=False) + ([t_tok.eos_token_id] if stopped[r] else [])
        lq = _log_softmax(teacher(jnp.asarray([t_prompt + t_row]))[0])[len(t_prompt) - 1:-1]
        np.testing.assert_allclose(lp[r].sum(), lq[np.arange(len(t_row)), t_row].sum(), rtol=1e-4)


@pytest.mark.parametrize("normalize", ["sequence"])  # per-sequence weights over the covered positions
def test_a_packed_cross_tokenizer_step_equals_the_padded_one(folders, tmp_path, normalize):
    """data.pack_tokens with a BPE teacher: it scores the padded rows in its own tokens, and its hidden states
    and the positions it covers move to the packed rows. The step (loss, divergence, the SGD change) equals
    the padded run's, with the covered positions a strict subset of the completion's."""
    from conftest import assert_same_step, one_sgd_step

    _, _, bpe = folders
    kw = {"loss.cross_tokenizer": "bpm", "loss.kind": "forward_kl", "loss.normalize": normalize, "train.steps": 1,
          "optim.name": "sgd", "optim.lr": 1.0}
    run, pad, rec0, b0 = one_sgd_step(_cfg(tmp_path / "pad", bpe, **kw))
    d = run.cfg.data
    _, packed, rec1, b1 = one_sgd_step(_cfg(tmp_path / "packed", bpe, **kw,
                                            **{"data.pack_tokens": 2 * (d.max_prompt_len + d.max_new_tokens)}))
    on = b0.arrays["on"]
    keep, mask = np.asarray(on.loss_mask), np.asarray(on.mask)
    assert 0 < keep.sum() < mask.sum()  # the teacher covers some positions, not all
    assert_same_step((rec0, pad, b0), (rec1, packed, b1))
    assert np.asarray(b1.arrays["on"].mask).sum() == keep.sum()  # the packed mask is the coverage


def test_bad_cross_tokenizer_input_is_refused_in_one_line(folders, tmp_path):
    tmp, same, bpe = folders
    bare = _model(tmp_path / "bare", 96, 3)  # a model folder without a tokenizer

    def refused(teacher, match, **extra):
        with pytest.raises(OpdError, match=match) as e:
            check_xtok(_cfg(tmp_path / "r", teacher, **extra))
        assert "\n" not in str(e.value)

    refused(bare, "has no tokenizer", **{"loss.cross_tokenizer": "bpm"})
    refused(bpe, "must be bpm, uld", **{"loss.cross_tokenizer": "bytes"})
    refused(bpe, "no top-k form", **{"loss.cross_tokenizer": "uld", "loss.estimator_type": "topk"})
    with pytest.raises(OpdError, match="served") as e:
        check_xtok(load_config(None, tiny_overrides(tmp_path / "r", **{
            "teachers": "[{name: t, url: 'http://127.0.0.1:1'}]", "loss.cross_tokenizer": "bpm",
            "routing": "{addition: t, reverse: t, sort: t}"})))
    with pytest.raises(OpdError, match="loss.cross_tokenizer bpm") as e:  # another vocabulary, no cross_tokenizer
        build_run(_cfg(tmp_path / "r2", bpe))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_the_readme_cross_tokenizer_example_runs_as_written(tmp_path):
    """The bash block of docs/training.md's "A teacher with another tokenizer", as written (in a scratch folder with
    the config it names): two tiny random models with different tokenizers and templates train, and the
    log shows the alignment statistics."""
    import json

    from conftest import run_readme_block

    res = run_readme_block("## A teacher with another tokenizer", "xtok_example.yaml", tmp_path, doc="docs/training.md")
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["step"] == 4 and 0.0 < last["xtok/aligned_fraction"] <= 1.0 and last["xtok/align_seconds"] > 0
    from opd_jax.tasks import load_tokenizer
    s_tok, t_tok = (load_tokenizer(tmp_path / "runs/chat" / n) for n in ("student", "teacher_llama"))
    assert s_tok.get_vocab() != t_tok.get_vocab() and t_tok.bos_token and not s_tok.bos_token


def test_a_teacher_tokenizer_that_cannot_be_its_models_is_refused_in_one_line(tmp_path):
    """teachers[].tokenizer naming the student's tokenizer for a Llama-style teacher (its EOS and BOS are
    other ids: it trained silently to a wrong loss before), a garbage tokenizer.json, and a folder with
    only tokenizer_config.json: one line each, before the run folder exists."""
    from pathlib import Path

    from opd_jax.tiny_chat import write_tiny_chat_models
    from opd_jax.train import train

    folders = write_tiny_chat_models(tmp_path / "chat", hidden_size=32)
    root = Path(__file__).resolve().parents[1]
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "tokenizer.json").write_text("{not json")
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    for tok, match in ((folders["student"], r"ends text with id \d+ but the model's EOS is"),
                       (garbage, "the tokenizer in .*garbage could not be read"),
                       (config_only, "no tokenizer.json in .*config_only .*only tokenizer_config.json")):
        cfg = load_config(root / "configs" / "xtok_example.yaml", [
            f"student.path={folders['student']}", f"train.out_dir={tmp_path / 'run'}",
            f"teachers=[{{name: llama, path: {folders['teacher_llama']}, tokenizer: {tok}, max_prompt_len: 64, "
            "max_new_tokens: 16}]"])
        with pytest.raises(OpdError, match=match) as e:
            train(cfg)
        assert "\n" not in str(e.value) and not (tmp_path / "run").exists()
