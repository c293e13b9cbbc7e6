"""On-policy self-distillation with privileged context (OPSD): a privileged teacher scores the student's
completion after its own prompt (the template filled with the row's prompt and answer), self_live
teachers score with the student's current weights, and no gradient reaches the teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax.config import load_config
from opd_jax.errors import OpdError
from opd_jax.models import load_model
from opd_jax.run import build_run
from opd_jax.tasks.domains import Example
from opd_jax.train_step import part_value_and_grad

from conftest import random_teacher, tiny_overrides

TEMPLATE = "answer {answer}. {prompt}"


@pytest.fixture(scope="module")
def opsd(tmp_path_factory):
    """addition -> a random teacher folder with the answer in its prompt; reverse, sort -> self_live, the
    student's current weights with the answer in their prompt."""
    tmp = tmp_path_factory.mktemp("opsd")
    folder = random_teacher(tmp)["teachers"].split("path: ")[1].rstrip("}]")
    cfg = load_config(None, tiny_overrides(tmp / "r", **{
        "teachers": f"[{{name: priv, path: {folder}, privileged: answer, privileged_template: '{TEMPLATE}'}}, "
                    f"{{name: live, path: self_live, privileged: answer, privileged_template: '{TEMPLATE}'}}]",
        "routing": "{addition: priv, reverse: live, sort: live}", "optim.name": "sgd", "optim.lr": 0.5}))
    return run_and_folder(cfg, folder)


def run_and_folder(cfg, folder):
    run = build_run(cfg)
    return run, load_model(folder)


def _direct_logprobs(model, tok, ex, completion, template=TEMPLATE):
    """log q(. | [BOS, template(prompt, answer), completion[:t]]) for t = 0..n-1, by one plain forward of the
    unpadded row (float64 log-softmax on the host) -> [n, V]."""
    ids = [tok.bos_token_id] + tok.encode(template.format(prompt=ex.prompt, answer=ex.answer), add_special_tokens=False)
    row = jnp.asarray([ids + list(completion)], jnp.int32)
    logits = np.asarray(model(row), np.float64)[0, len(ids) - 1:len(ids) - 1 + len(completion)]
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1,
                                                                                                            keepdims=True)


def _check_scores(run, batch, models, template=TEMPLATE):
    """Each teacher's hand-over (hidden states x its output matrix) equals the direct forward of
    [privileged prompt; completion] at every completion token."""
    on, p = batch.arrays["on"], run.cfg.data.max_prompt_len
    tokens, mask = np.asarray(on.tokens), np.asarray(on.mask)
    groups = run.rows.groups(tokens.shape[0])
    for name, idx in groups.items():
        hidden = np.asarray(on.teacher[name], np.float64)
        w = np.asarray(models[name].output_matrix(), np.float64)
        for j, i in enumerate(idx):
            n = int(mask[i].sum())
            got = hidden[j, :n] @ w
            got = got - got.max(-1, keepdims=True)
            got = got - np.log(np.exp(got).sum(-1, keepdims=True))
            ref = _direct_logprobs(models[name], run.tokenizer, batch.examples[i], tokens[i, p:p + n], template)
            np.testing.assert_allclose(got, ref, atol=2e-4, err_msg=f"{name} row {i}")


def test_privileged_and_live_scores_equal_a_direct_forward_before_and_after_an_update(opsd):
    run, priv = opsd
    state = jax.tree.map(lambda x: x.copy(), run.init)  # the update donates its state; run.init is shared
    params0 = jax.tree.map(np.asarray, state.params)
    batch = run.rollouts.collect(0, state, decode=True)
    _check_scores(run, batch, {"priv": priv, "live": nnx.merge(run.graphdef, state.params)})
    state, _ = run.update(state, batch.arrays, run.live_w(state.params))
    batch = run.rollouts.collect(1, state, decode=True)
    live = nnx.merge(run.graphdef, state.params)
    _check_scores(run, batch, {"priv": priv, "live": live})  # the live teacher has the new weights
    with pytest.raises(AssertionError):  # and not the snapshot's
        _check_scores(run, batch, {"priv": priv, "live": nnx.merge(run.graphdef, params0)})


def test_no_gradient_flows_through_the_live_teacher(opsd):
    """After one update, the step's gradient equals jax.grad of the token-mean reverse KL written by hand
    with the teacher's log-probs (the live weights with the answer in the prompt) held constant; the
    same objective differentiated through the teacher as well gives another gradient."""
    run, priv = opsd
    state = jax.tree.map(lambda x: x.copy(), run.init)  # the update donates its state; run.init is shared
    batch = run.rollouts.collect(0, state)
    state, _ = run.update(state, batch.arrays, run.live_w(state.params))
    batch = run.rollouts.collect(1, state)
    on, p = batch.arrays["on"], run.cfg.data.max_prompt_len
    (_, _), grads = part_value_and_grad(run.graphdef, state.params, on, run.spec, run.live_w(state.params))
    tokens, pmask, mask = (np.asarray(getattr(on, k)) for k in ("tokens", "prompt_mask", "mask"))
    live_rows = run.rows.groups(tokens.shape[0])["live"]
    tok = run.tokenizer

    # each row as a direct forward of its own tokens: the student's prompt without padding, the teacher's
    # template prompt; right-padded to one length (a causal forward never reads what comes after)
    s_rows, t_rows, s_at, t_at, n_of = [], [], [], [], []
    for i in range(tokens.shape[0]):
        n = int(mask[i].sum())
        s_rows.append([int(t) for t, m in zip(tokens[i, :p], pmask[i]) if m] + [int(t) for t in tokens[i, p:p + n]])
        ex = batch.examples[i]
        ids = [tok.bos_token_id] + tok.encode(TEMPLATE.format(prompt=ex.prompt, answer=ex.answer),
                                              add_special_tokens=False)
        t_rows.append(ids + [int(t) for t in tokens[i, p:p + n]])
        s_at.append(len(s_rows[-1]) - n - 1)
        t_at.append(len(ids) - 1)
        n_of.append(n)
    width = lambda rows: max(map(len, rows))  # noqa: E731
    s_ids = jnp.asarray([r + [0] * (width(s_rows) - len(r)) for r in s_rows])
    t_ids = jnp.asarray([r + [0] * (width(t_rows) - len(r)) for r in t_rows])
    j = np.arange(mask.shape[1])
    real = jnp.asarray(j[None] < np.asarray(n_of)[:, None], jnp.float32)  # [B, N]
    s_idx = jnp.asarray(np.minimum(np.asarray(s_at)[:, None] + j, s_ids.shape[1] - 1))
    t_idx = jnp.asarray(np.minimum(np.asarray(t_at)[:, None] + j, t_ids.shape[1] - 1))
    live = jnp.asarray(np.isin(np.arange(tokens.shape[0]), live_rows))[:, None, None]
    at = lambda lp, idx: jnp.take_along_axis(lp, idx[..., None], 1)  # noqa: E731  [B, N, V]

    def objective(params, through_teacher: bool):
        model = nnx.merge(run.graphdef, params)
        s = at(jax.nn.log_softmax(model(s_ids), -1), s_idx)
        q = at(jnp.where(live, jax.nn.log_softmax(model(t_ids), -1), jax.nn.log_softmax(priv(t_ids), -1)), t_idx)
        if not through_teacher:
            q = jax.lax.stop_gradient(q)
        return jnp.sum(real * jnp.sum(jnp.exp(s) * (s - q), -1)) / mask.sum()

    host = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state.params)  # one device, as the folder's teacher
    grad = jax.jit(jax.grad(objective), static_argnums=1)
    ref = grad(host, False)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-5)
    through = grad(host, True)
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(through), jax.tree.leaves(ref))) > 1e-3


def test_a_row_without_an_answer_and_bad_privileged_configs_are_one_line_errors(opsd, tmp_path):
    run, _ = opsd
    from opd_jax.batch import Rows

    priv = run.teachers["priv"]
    toks = jnp.zeros((1, run.cfg.data.max_prompt_len + run.cfg.data.max_new_tokens), jnp.int32)
    rows = lambda ex: Rows(toks, jnp.ones_like(toks), run.cfg.data.max_prompt_len, [ex])  # noqa: E731
    with pytest.raises(OpdError, match=r"teacher 'priv' is privileged \(answer\) but a 'addition' row has no "
                                       r"answer: 'add:1\+2='") as e:
        priv.score(rows(Example("add:1+2=", None, "addition")), "hidden", temperature=1.0)
    assert "\n" not in str(e.value)
    long = Example("add:1+2=", "3" * 40, "addition")
    with pytest.raises(OpdError, match=r"privileged prompt: .*data.max_privileged_len, now 32"):
        priv.score(rows(long), "hidden", temperature=1.0)
    for extra, message in [
        ({"teachers": "[{name: t, path: self, privileged: answer, privileged_template: 'no fields'}]"},
         r"privileged_template must contain \{prompt\}"),
        ({"teachers": "[{name: t, path: self, privileged: hint}]"}, "privileged must be 'answer'"),
        ({"teachers": "[{name: t, path: self_live}]", "train.max_staleness": 1},
         "self_live .* cannot be used with train.max_staleness >= 1"),
        ({"teachers": "[{name: t, path: self, privileged: answer}]", "data.max_privileged_len": 60},
         r"teacher 't': data.max_privileged_len 60 \+ max_new_tokens 6 = 66 exceeds its context 64"),
    ]:
        over = tiny_overrides(tmp_path / "x", **{"routing": "{addition: t, reverse: t, sort: t}", **extra})
        with pytest.raises(OpdError, match=message):
            build_run(load_config(None, over))
        assert not (tmp_path / "x").exists()


def test_a_context_teacher_sees_an_instruction_the_student_does_not(tmp_path):
    """Context distillation (privileged: context): rows without answers; the teacher scores the student's
    completion after its template filled with the prompt alone, equal to a direct forward of
    [BOS, template(prompt), completion]; a template with {answer} is refused for it."""
    import json

    template = "{prompt} be brief"
    folder = random_teacher(tmp_path)["teachers"].split("path: ")[1].rstrip("}]")
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"add:{a}+{b}=", "domain": "addition"})
                              for a, b in ((1, 2), (30, 4), (7, 7))) + "\n")
    over = {"data.path": str(data), "data.domains": "[]", "routing": "{addition: ctx}", "loss.estimator_type": "full"}
    cfg = load_config(None, tiny_overrides(tmp_path / "r", **over, teachers=(
        f"[{{name: ctx, path: {folder}, privileged: context, privileged_template: '{template}'}}]")))
    run = build_run(cfg)
    batch = run.rollouts.collect(0, jax.tree.map(lambda x: x.copy(), run.init), decode=True)
    assert all(ex.answer is None for ex in batch.examples)
    _check_scores(run, batch, {"ctx": load_model(folder)}, template)
    with pytest.raises(OpdError, match="privileged: context shows the teacher an instruction, not the answer"):
        build_run(load_config(None, tiny_overrides(tmp_path / "r2", **over, teachers=(
            f"[{{name: ctx, path: {folder}, privileged: context, privileged_template: '{{prompt}} {{answer}}'}}]"))))
