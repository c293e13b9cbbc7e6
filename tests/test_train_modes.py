"""Every training mode's contract in one place: one trainer step equals a direct call of the public
`opd_jax.losses` functions on the same tokens.

The reference side never uses the trainer's teacher scores or its completion alignment: it runs the
student and each teacher as plain models over the whole token rows (`model(tokens, mask)`),
slices the positions that predict the completion by hand, and takes every temperature, top-k and
log-prob itself. The trainer runs SGD with lr 1, no momentum and no clipping, so its gradient is
exactly params_before - params_after.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import opd_jax
from opd_jax import losses as L
from opd_jax.config import load_config
from opd_jax.models import save_model
from opd_jax.run import build_run

from conftest import char_tokenizer_dir, host, rigged_model, tiny_model, tiny_overrides
from conftest import run_steps as loop_steps

DOMAINS = ("addition", "reverse", "sort")


def random_model(folder, seed, std=0.05, **shape):
    """A tiny model with N(0, std) matrices (peaked, distinct distributions), saved as an HF folder."""
    return tiny_model(seed, scale=std / 0.02, folder=folder, **shape)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A student and two random teachers (different seeds, all unlike each other) as HF folders; "wide"
    is twice the student's width, so its hidden states and output matrix have another shape."""
    root = tmp_path_factory.mktemp("mode_models")
    out = {name: random_model(root / name, seed) for name, seed in (("student", 10), ("t1", 11))}
    out["wide"] = random_model(root / "wide", 12, hidden_size=64, intermediate_size=96)
    out["tokenizer"] = char_tokenizer_dir(root / "tokenizer")  # the folders are saved without one
    return out


@pytest.fixture(scope="module")
def teacher_models(teachers):
    """The teachers as plain models (graphdef, state), read once."""
    return {n: nnx.split(opd_jax.load_model(teachers[n])) for n in ("t1", "wide")}


def make_trainer(tmp_path, teachers, routing=None, **extra):
    routing = routing or {d: "t1" for d in DOMAINS}
    used = sorted(set(routing.values()))
    over = {"student.path": str(teachers["student"]), "data.tokenizer": str(teachers["tokenizer"]), "train.steps": 4, "train.eval_every": 100, "train.checkpoint_every": 100,
            "optim.name": "sgd", "optim.lr": 1.0, "optim.momentum": 0.0, "optim.clip_norm": 0.0,
            "teachers": "[" + ", ".join(f"{{name: {n}, path: {teachers[n]}}}" for n in used) + "]",
            "routing": "{" + ", ".join(f"{d}: {t}" for d, t in routing.items()) + "}", **extra}
    return build_run(load_config(None, tiny_overrides(tmp_path / "run", **over)))


def completion_logits(model, tokens, full_mask, prompt_len):
    """Raw float32 logits at the positions that predict tokens[:, P:], from the whole-row forward."""
    return model(tokens, attention_mask=full_mask)[:, prompt_len - 1:-1].astype(jnp.float32)


def token_logprobs(logits, ids, temperature):
    return jnp.take_along_axis(jax.nn.log_softmax(logits / temperature, -1), ids[..., None], -1)[..., 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len"))
def forward_logits(graphdef, state, tokens, full_mask, prompt_len):
    return completion_logits(nnx.merge(graphdef, state), tokens, full_mask, prompt_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len"))
def params_cotangent(graphdef, params, tokens, full_mask, d_logits, prompt_len):
    """dL/dparams from dL/dlogits by the chain rule through the plain forward (one compile for
    every mode: the loss-specific part stays a small function of the logits)."""
    _, vjp = jax.vjp(lambda p: forward_logits(graphdef, p, tokens, full_mask, prompt_len), params)
    return vjp(d_logits)[0]


def reference_loss(s, b, t, *, lc, temperature, prompt_len, group_size):
    """The configured loss of one batch straight from `opd_jax.losses` -> (loss, metrics), as a
    function of the student's raw completion logits s [B, N, V]; t: the teacher's, same shape."""
    T = temperature
    t = jax.lax.stop_gradient(t)
    comp, mask = b["tokens"][:, prompt_len:], b["mask"]
    div = dict(kind=lc.kind, beta=lc.beta, alpha=lc.alpha_div, normalize=lc.normalize)
    if lc.estimator_type == "full":
        return L.full_vocab_loss(s, t, mask, temperature=T, **div)
    if lc.estimator_type == "topk":
        vals, ids = L.teacher_topk(t, lc.topk, T)
        return L.topk_distill_loss(s, vals, ids, mask, temperature=T, **div)
    slp, tlp = token_logprobs(s, comp, T), token_logprobs(t, comp, T)
    if lc.rl_alpha < 1 or lc.rl_mode == "replace":
        return L.rl_opd_surrogate(slp, tlp, b["rewards"], mask, group_size=group_size, alpha=lc.rl_alpha,
                                  mode=lc.rl_mode, kind=lc.kind, estimator=lc.estimator, normalize=lc.normalize,
                                  sampler_logprobs=b["sampler_logprobs"], clip_eps=lc.clip_eps)
    return L.sampled_surrogate(slp, tlp, mask, estimator=lc.estimator, level=lc.level, baseline=lc.baseline,
                               sampler_logprobs=b["sampler_logprobs"], clip_eps=lc.clip_eps, **div)


class Ref:
    """The reference side for one trainer: plain teachers run over whole rows, and the loss library."""

    def __init__(self, tr, models):
        self.tr, self.cfg = tr, tr.cfg
        self.P = tr.cfg.data.max_prompt_len
        self.T = tr.cfg.data.temperature
        self.teachers = models
        self.static = dict(lc=tr.cfg.loss, temperature=self.T, prompt_len=self.P, group_size=tr.cfg.data.group_size)
        self._vg = jax.jit(jax.value_and_grad(functools.partial(reference_loss, **self.static), has_aux=True))

    def teacher_logits(self, b, domains):
        """Each row's logits from the teacher its own domain routes to (every teacher runs the whole
        batch; rows are then picked by domain)."""
        out = {n: np.asarray(forward_logits(g, st, b["tokens"], b["full_mask"], self.P))
               for n, (g, st) in self.teachers.items()}
        return np.stack([out[self.cfg.routing[d]][r] for r, d in enumerate(domains)])

    def student_logits(self, params, b):
        return forward_logits(self.tr.graphdef, params, b["tokens"], b["full_mask"], self.P)

    def value_and_grad(self, params, b, domains, weight=1.0):
        """((loss, metrics), dloss/dparams) of `weight` * the configured loss of batch b."""
        (loss, m), d_logits = self._vg(self.student_logits(params, b), b, self.teacher_logits(b, domains))
        grads = params_cotangent(self.tr.graphdef, params, b["tokens"], b["full_mask"], weight * d_logits, self.P)
        return (loss, m), grads


def on_policy_rows(tr, step):
    """The trainer's own rollout for `step` on host, and each row's domain (from the examples)."""
    examples = tr.source.batch(step, tr.cfg.data.per_domain)
    key = jax.random.fold_in(tr.init.key(), step)
    batch, rep, _, rewards, _ = tr.rollouts.on_policy(tr.init.params, examples, key)
    b = {k: np.asarray(getattr(batch, k)) for k in ("tokens", "prompt_mask", "mask", "sampler_logprobs")}
    b["full_mask"] = np.concatenate([b["prompt_mask"], b["mask"]], 1)
    b["rewards"] = np.asarray(rewards, np.float32)
    assert b["mask"].sum() > len(rep)  # real multi-token completions
    return b, [e.domain for e in rep], examples


def run_steps(tr, n):
    """n steps through the library's own loop -> (params before, params after, last record)."""
    p0 = host(tr.init.params)
    state, rec = loop_steps(tr, n)
    return p0, host(state.params), rec


def assert_step_is_gradient(p0, p1, grads, lr=1.0):
    """(p0 - p1) / lr equals the reference gradient leaf by leaf: to 2e-5 absolute (1e-4 of its largest
    entry if that is smaller) plus 1e-4 relative (float32 sums of sequence-level terms near 0.5, summed in
    another order by the trainer's program than by the reference's: 1.05e-5 seen on one entry of 2,048)."""
    scale = max(float(np.max(np.abs(np.asarray(g)))) for g in jax.tree.leaves(grads))
    assert scale > 1e-3  # the teacher differs from the student: a real update, not rounding noise
    for (path, a), b, g in zip(jax.tree_util.tree_leaves_with_path(p0), jax.tree.leaves(p1), jax.tree.leaves(grads)):
        np.testing.assert_allclose((a - b) / lr, np.asarray(g), atol=min(2e-5, 1e-4 * scale), rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------ modes

MODES = {
    "full-T0.7": {"loss.estimator_type": "full", "loss.kind": "reverse_kl", "data.temperature": 0.7},
    "topk-T0.7": {"loss.estimator_type": "topk", "loss.kind": "jsd", "loss.beta": 0.3, "loss.topk": 4,
                  "data.temperature": 0.7},
    "sampled-token-T0.7": {"loss.estimator_type": "sampled", "loss.kind": "forward_kl", "loss.estimator": "opd_plus",
                           "data.temperature": 0.7},
    "sampled-sequence": {"loss.estimator_type": "sampled", "loss.kind": "forward_kl", "loss.estimator": "opd_plus",
                         "loss.level": "sequence"},
    # micro-batches inside the step (train.micro_batch rows per forward/backward) equal the whole batch
    "full-micro4": {"loss.estimator_type": "full", "loss.kind": "forward_kl", "train.micro_batch": 4},
    "topk-micro6-sequence-norm": {"loss.estimator_type": "topk", "loss.kind": "reverse_kl", "loss.topk": 3,
                                  "loss.normalize": "sequence", "train.micro_batch": 6},
    "sampled-sequence-micro4": {"loss.estimator_type": "sampled", "loss.kind": "jsd", "loss.level": "sequence",
                                "train.micro_batch": 4},
    "sampled-loo": {"loss.estimator_type": "sampled", "loss.kind": "reverse_kl", "loss.estimator": "stop_grad",
                    "loss.baseline": "loo"},
}


@pytest.mark.parametrize("name", list(MODES))
def test_on_policy_step_equals_the_loss_library(tmp_path, teachers, teacher_models, name):
    tr = make_trainer(tmp_path, teachers, **MODES[name])
    ref = Ref(tr, teacher_models)
    b, domains, _ = on_policy_rows(tr, 0)
    p0, p1, rec = run_steps(tr, 1)
    (loss, m), grads = ref.value_and_grad(p0, b, domains)
    assert rec["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert rec["on_policy/divergence"] == pytest.approx(float(m["divergence"]), abs=1e-5)
    assert_step_is_gradient(p0, p1, grads)
    # the sampler draws at the same temperature: its log-probs are the student's at T
    want = token_logprobs(ref.student_logits(p0, b), b["tokens"][:, ref.P:], ref.T)
    np.testing.assert_allclose(b["sampler_logprobs"] * b["mask"], np.asarray(want) * b["mask"], atol=1e-4)


@pytest.mark.parametrize("over", [
    {"loss.estimator_type": "full", "loss.kind": "jsd"},
    # each teacher's rows (8 for t1 from two apart domains, 4 for wide) in micro-batches of 4
    {"loss.estimator_type": "topk", "loss.topk": 3, "loss.kind": "reverse_kl", "loss.normalize": "sequence",
     "train.micro_batch": 4},
    # per-token teacher log-probs: t1's two domains come back from one call and go to their own rows
    {"loss.estimator_type": "sampled", "loss.estimator": "opd_plus", "loss.kind": "reverse_kl"}],
    ids=["full", "topk-micro4-sequence-norm", "sampled"])
def test_multi_teacher_rows_use_their_routed_teacher(tmp_path, teachers, teacher_models, over, monkeypatch):
    """Rows go to the teacher their domain routes to, each scored with its own output matrix (one of
    them of another width), and the step equals the loss over the whole batch. Each teacher runs once
    per step, on all its rows (t1 serves two domains that are not next to each other)."""
    import opd_jax.teachers as teachers_mod

    routing = {"addition": "t1", "reverse": "wide", "sort": "t1"}
    tr = make_trainer(tmp_path, teachers, routing, **over)
    ref = Ref(tr, teacher_models)
    b, domains, _ = on_policy_rows(tr, 0)
    assert "reverse" in domains and "addition" in domains
    calls = []
    forward = teachers_mod.teacher_forward
    monkeypatch.setattr(teachers_mod, "teacher_forward", lambda t, tokens, *a, **k: (
        calls.append((t.name, tokens.shape[0])), forward(t, tokens, *a, **k))[1])
    p0, p1, rec = run_steps(tr, 1)
    assert sorted(calls) == [("t1", 2 * len(domains) // 3), ("wide", len(domains) // 3)]
    (loss, m), grads = ref.value_and_grad(p0, b, domains)
    assert rec["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert_step_is_gradient(p0, p1, grads)
    # per-teacher divergence: the mean over exactly the rows routed to each teacher
    per_tok = np.asarray(m["per_token_divergence"]) * b["mask"]
    row = per_tok.sum(1) / np.maximum(b["mask"].sum(1), 1)
    for t in ("t1", "wide"):
        rows = [i for i, d in enumerate(domains) if routing[d] == t]
        assert rec[f"teacher/{t}/divergence"] == pytest.approx(float(row[rows].mean()), abs=1e-5)


def dataset_rows(tok, examples, prompt_len, max_new):
    """Off-policy rows built by hand: [<bos> prompt chars] left-padded, then [answer chars, <eos>],
    right-padded; masks 1 on real prompt tokens / answer tokens incl. EOS."""
    n = len(examples)
    tokens = np.zeros((n, prompt_len + max_new), np.int32)
    pmask = np.zeros((n, prompt_len), np.int32)
    amask = np.zeros((n, max_new), np.int32)
    ids = tok.convert_tokens_to_ids
    for r, e in enumerate(examples):
        p = [tok.bos_token_id] + [ids(c) for c in e.prompt]
        a = ([ids(c) for c in e.answer] + [tok.eos_token_id])[:max_new]
        tokens[r, prompt_len - len(p):prompt_len] = p
        pmask[r, prompt_len - len(p):] = 1
        tokens[r, prompt_len:prompt_len + len(a)] = a
        amask[r, :len(a)] = 1
    return tokens, pmask, amask


@pytest.mark.parametrize("micro", [0, 6])  # 6: the 12 on-policy rows in two micro-batches, the 6 dataset rows in one
def test_gkd_mixes_on_policy_samples_and_dataset_answers_with_lambda(tmp_path, teachers, teacher_models, micro):
    lam = 0.3
    tr = make_trainer(tmp_path, teachers, **{"loss.estimator_type": "full", "loss.kind": "forward_kl",
                                             "loss.lam": lam, "train.micro_batch": micro})
    ref = Ref(tr, teacher_models)
    on, on_domains, examples = on_policy_rows(tr, 0)
    tokens, pmask, amask = dataset_rows(tr.tokenizer, examples, ref.P, tr.cfg.data.max_new_tokens)
    off = {"tokens": tokens, "mask": amask, "full_mask": np.concatenate([pmask, amask], 1)}
    assert not np.array_equal(on["tokens"][::tr.cfg.data.group_size], tokens)  # the halves really differ
    p0, p1, rec = run_steps(tr, 1)

    (l_on, m_on), g_on = ref.value_and_grad(p0, on, on_domains, weight=lam)
    (l_off, m_off), g_off = ref.value_and_grad(p0, off, [e.domain for e in examples], weight=1 - lam)
    loss, grads = lam * l_on + (1 - lam) * l_off, jax.tree.map(jnp.add, g_on, g_off)
    assert rec["on_policy/divergence"] == pytest.approx(float(m_on["divergence"]), abs=1e-5)
    assert rec["off_policy/divergence"] == pytest.approx(float(m_off["divergence"]), abs=1e-5)
    assert rec["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert_step_is_gradient(p0, p1, grads)


def test_micro_batch_sizes_that_cannot_split_the_rows_are_refused(tmp_path, teachers):
    from opd_jax import OpdError

    with pytest.raises(OpdError, match="micro_batch=5 does not divide the 12 on-policy rows"):
        make_trainer(tmp_path / "a", teachers, **{"train.micro_batch": 5})
    with pytest.raises(OpdError, match="multiple of data.group_size=2"):
        make_trainer(tmp_path / "b", teachers, **{"train.micro_batch": 3})
    with pytest.raises(OpdError, match="baseline=loo .* cannot be split"):
        make_trainer(tmp_path / "c", teachers, **{"train.micro_batch": 4, "loss.estimator_type": "sampled",
                                                  "loss.baseline": "loo"})


@pytest.mark.parametrize("mode", ["mix", "replace"])
def test_rl_plus_opd_step_uses_rewards_and_the_opd_advantage(tmp_path, teachers, teacher_models, monkeypatch, mode):
    """Rewards are fixed per row (a random student earns none), so the GRPO part is not zero."""
    import opd_jax.rollouts as rollouts_mod

    fixed = lambda examples, texts, verifiers=None: np.array([float(i % 3 == 0) for i in range(len(examples))], np.float32)  # noqa: E731
    monkeypatch.setattr(rollouts_mod, "rewards_for", fixed)
    tr = make_trainer(tmp_path, teachers, **{"loss.estimator_type": "sampled", "loss.kind": "reverse_kl",
                                             "loss.rl_alpha": 0.4, "loss.rl_mode": mode})
    ref = Ref(tr, teacher_models)
    b, domains, _ = on_policy_rows(tr, 0)
    assert np.ptp(L.group_advantages(jnp.asarray(b["rewards"]), tr.cfg.data.group_size)) > 0.5
    p0, p1, rec = run_steps(tr, 1)
    (loss, m), grads = ref.value_and_grad(p0, b, domains)
    assert rec["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert rec["reward"] == pytest.approx(float(b["rewards"].mean()))
    assert_step_is_gradient(p0, p1, grads)


def test_accumulate_two_is_the_mean_of_two_batches_gradients(tmp_path, teachers, teacher_models):
    tr = make_trainer(tmp_path, teachers, **{"loss.estimator_type": "full", "loss.kind": "reverse_kl",
                                             "optim.accumulate": 2})
    ref = Ref(tr, teacher_models)
    b0, d0, _ = on_policy_rows(tr, 0)
    b1, d1, _ = on_policy_rows(tr, 1)  # the parameters do not move until the second micro-step
    assert not np.array_equal(b0["tokens"], b1["tokens"])
    p0, p1, _ = run_steps(tr, 2)
    g0 = ref.value_and_grad(p0, b0, d0)[1]
    g1 = ref.value_and_grad(p0, b1, d1)[1]
    assert_step_is_gradient(p0, p1, jax.tree.map(lambda a, b: (a + b) / 2, g0, g1))


# ------------------------------------------------------------------------------------------ PPO clipping

def _numpy_ppo(slp, tlp, old, rewards, mask, group, alpha, eps, mode):
    """Reverse-KL OPD+ weight w = 1 - (log q - log pi); GRPO advantage; PPO-clipped loss and its
    gradient in the student log-probs, written out branch by branch."""
    w = 1.0 - (tlp - slp)
    g = rewards.reshape(-1, group)
    a_rl = ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)).reshape(-1, 1)
    adv = -w if mode == "replace" else (1 - alpha) * a_rl + alpha * (-w)
    rho = np.exp(slp - old)
    n = mask.sum()
    loss_tok = -np.minimum(adv * rho, adv * np.clip(rho, 1 - eps, 1 + eps))
    clipped_branch = ((adv > 0) & (rho > 1 + eps)) | ((adv < 0) & (rho < 1 - eps))  # min takes the constant
    grad = np.where(clipped_branch, 0.0, -adv * rho) * mask / n
    clip_frac = (np.abs(rho - 1) > eps).astype(np.float64)
    return (loss_tok * mask).sum() / n, grad, (clip_frac * mask).sum() / n, clipped_branch


@pytest.mark.parametrize("mode", ["mix", "replace"])
def test_rl_opd_ppo_clipping_against_numpy(mode):
    rng = np.random.RandomState(0)
    B, T, G, eps, alpha = 8, 12, 4, 0.2, 0.4
    slp = rng.uniform(-3, -0.1, (B, T))
    tlp = slp + rng.normal(0, 1.0, (B, T))
    old = slp + rng.normal(0, 0.4, (B, T))  # stale sampler: ratios cross both clip edges
    rewards = rng.randint(0, 2, B).astype(np.float64)
    mask = (np.arange(T)[None] < rng.randint(3, T + 1, B)[:, None]).astype(np.float64)
    want, want_grad, want_cf, clipped = _numpy_ppo(slp, tlp, old, rewards, mask, G, alpha, eps, mode)
    assert clipped[mask > 0].any() and (~clipped[mask > 0]).any()
    rho = np.exp(slp - old)
    assert ((rho > 1 + eps) & (mask > 0)).any() and ((rho < 1 - eps) & (mask > 0)).any()
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

    def loss(s):
        return L.rl_opd_surrogate(s, f32(tlp), f32(rewards), f32(mask), group_size=G, alpha=alpha, mode=mode,
                                  kind="reverse_kl", estimator="opd_plus", sampler_logprobs=f32(old), clip_eps=eps)

    (got, m), g = jax.value_and_grad(loss, has_aux=True)(f32(slp))
    assert float(got) == pytest.approx(want, abs=1e-5)
    np.testing.assert_allclose(np.asarray(g), want_grad, atol=1e-6)
    assert float(m["clip_fraction"]) == pytest.approx(want_cf, abs=1e-6)


def test_sampled_surrogate_ppo_clipping_against_numpy():
    """The plain OPD surrogate with stale sampler log-probs: per token max(w rho, w clip(rho)) (w is a
    cost), gradient w rho where that branch is the unclipped one, else 0."""
    rng = np.random.RandomState(1)
    B, T, eps = 6, 10, 0.2
    slp = rng.uniform(-3, -0.1, (B, T))
    tlp = slp + rng.normal(0, 1.0, (B, T))
    old = slp + rng.normal(0, 0.4, (B, T))
    mask = (np.arange(T)[None] < rng.randint(2, T + 1, B)[:, None]).astype(np.float64)
    w = 1.0 - (tlp - slp)  # reverse KL, OPD+
    rho = np.exp(slp - old)
    n = mask.sum()
    want = (np.maximum(w * rho, w * np.clip(rho, 1 - eps, 1 + eps)) * mask).sum() / n
    const = ((w > 0) & (rho < 1 - eps)) | ((w < 0) & (rho > 1 + eps))
    assert const[mask > 0].any()
    want_grad = np.where(const, 0.0, w * rho) * mask / n
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    got, g = jax.value_and_grad(lambda s: L.sampled_surrogate(s, f32(tlp), f32(mask), "reverse_kl",
                                                              sampler_logprobs=f32(old), clip_eps=eps)[0])(f32(slp))
    assert float(got) == pytest.approx(want, abs=1e-5)
    np.testing.assert_allclose(np.asarray(g), want_grad, atol=1e-6)


# ------------------------------------------------------------------------------------------ EffOPD keep

def test_effopd_guard_keeps_a_jump_that_lowers_the_probe_divergence(tmp_path, teachers):
    """Small SGD steps that agree from window to window: each extrapolation is a longer step downhill,
    so the guard must keep every jump and end exactly where unguarded EffOPD ends."""
    import json

    from opd_jax.optim import find_state

    from opd_jax.train import restore_run_params, train

    common = {"loss.estimator_type": "full", "loss.kind": "forward_kl", "optim.lr": 0.05, "optim.effopd_window": 1,
              "optim.effopd_alpha_max": 1.0, "optim.effopd_min_cos": -1.0, "optim.effopd_probe_per_domain": 2,
              "train.steps": 3, "train.checkpoint_every": 3}
    plain, _ = loop_steps(make_trainer(tmp_path / "effopd", teachers, **common), 3)
    assert float(find_state(plain.opt_state).alpha) > 0.5  # the transform really extrapolated
    guarded = make_trainer(tmp_path / "guarded", teachers, **common, **{"optim.effopd_guard": "true"}).cfg
    train(guarded)
    recs = [json.loads(x) for x in (tmp_path / "guarded" / "run" / "metrics.jsonl").read_text().splitlines()]
    jumps = [r for r in recs if "effopd/rolled_back" in r]
    assert [r["step"] for r in jumps] == [2, 3]
    for r in jumps:
        assert r["effopd/alpha"] > 0.5 and r["effopd/rolled_back"] == 0.0
        assert r["effopd/probe_after"] < r["effopd/probe_before"]
    after = restore_run_params(guarded.train.out_dir)[1]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(host(plain.params)), jax.tree.leaves(host(after))):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------ known answers

@pytest.fixture(scope="module")
def answer_42(tmp_path_factory):
    """(char tokenizer, model that writes '42' then EOS after any prompt ending in '=')."""
    from opd_jax.tasks import build_char_tokenizer

    tok = build_char_tokenizer(None)
    i = tok.convert_tokens_to_ids
    return tok, rigged_model({i("="): i("4"), i("4"): i("2"), i("2"): tok.eos_token_id})


def test_greedy_accuracy_is_exact_on_rigged_answers(answer_42):
    from opd_jax.evaluate import greedy_accuracy
    from opd_jax.tasks import Example

    tok, model = answer_42
    right = [Example(p, "42", "right") for p in ("add:40+2=", "add:41+1=", "sort:24=")]
    wrong = [Example(p, "43", "wrong") for p in ("add:40+3=", "x=")]
    acc = greedy_accuracy(model, tok, right + wrong, max_prompt_len=12, max_new_tokens=5, batch=3)  # padded 2nd batch
    assert acc == {"right": 1.0, "wrong": 0.0, "mean": 0.5}


def test_decode_rewards_and_dataset_rows_on_hand_built_rows(answer_42):
    from opd_jax.evaluate import decode_completions, rewards_for
    from opd_jax.tasks import Example, encode_pairs

    tok, _ = answer_42
    i, eos, pad = tok.convert_tokens_to_ids, tok.eos_token_id, tok.pad_token_id
    tokens = np.array([[i("4"), i("2"), eos, pad, pad],      # answer, EOS, padding
                       [i("4"), i("3"), i("1"), i("2"), i("0")],  # no EOS: every token counts
                       [eos, pad, pad, pad, pad]])           # empty answer
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    texts = decode_completions(tok, tokens, mask)
    assert texts == ["42", "43120", ""]
    ex = [Example("p", "42", "d"), Example("p", "43", "d"), Example("p", None, "d")]
    np.testing.assert_array_equal(rewards_for(ex, texts), [1.0, 0.0, 0.0])
    examples = [Example("add:4+5=", "9", "a"), Example("rev:abc=", "cba", "b"), Example("x=", "123456", "c")]
    want = dataset_rows(tok, examples, 10, 4)  # the last answer is cut to 4 tokens, EOS dropped
    got = encode_pairs(tok, [e.prompt for e in examples], [e.answer for e in examples], 10, 4)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)
    assert want[0][2, 10:].tolist() == [i(c) for c in "1234"] and want[2][2].tolist() == [1, 1, 1, 1]
    assert want[0][0, 10:].tolist() == [i("9"), eos, 0, 0] and want[0][0, 9] == i("=")


def test_trainer_rewards_and_evaluation_on_a_rigged_student(tmp_path, teachers, answer_42):
    """Through the trainer: on-policy rewards and per-domain eval accuracy of a student that always
    answers '42' are exactly 1 where the answer is 42 and 0 elsewhere."""
    import json

    tok, model = answer_42
    student = save_model(model, tmp_path / "rigged")
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [{"prompt": "add:40+2=", "domain": "right", "answer": "42"},
                                                       {"prompt": "x=", "domain": "wrong", "answer": "7"},
                                                       {"prompt": "y=", "domain": "mathy", "answer": "42.0"}]))
    tr = build_run(load_config(None, tiny_overrides(tmp_path / "run", **{
        "student.path": str(student), "student.init": "{}", "data.path": str(data), "data.domains": "[]",
        "data.tokenizer": str(char_tokenizer_dir(tmp_path / "tok")),
        "teachers": f"[{{name: t, path: {student}}}]", "routing": "{right: t, wrong: t, mathy: t}",
        "train.eval_per_domain": 3, "data.max_new_tokens": 5, "data.verifiers": "{mathy: math}"})))
    examples = tr.source.batch(0, tr.cfg.data.per_domain)
    rewards = tr.rollouts.on_policy(tr.init.params, examples, jax.random.key(0))[3]
    # "42" vs "42.0" is right only by the math verifier the config names for that domain
    want = [0.0 if e.domain == "wrong" else 1.0 for e in examples for _ in range(tr.cfg.data.group_size)]
    np.testing.assert_array_equal(rewards, want)
    assert tr.rollouts.evaluate(tr.init.params, tr.eval_examples)[0] == {"mathy": 1.0, "right": 1.0, "wrong": 0.0,
                                                                         "mean": 2 / 3}


def test_the_model_folders_generation_config_stop_ids_end_completions(tmp_path):
    """A student whose generation_config.json lists 'z' as a stop id: its completion "42z<eos>" ends at
    'z', so the reward and eval accuracy count "42" (without the file the text is "42z": reward 0).
    A generation_config.json that is not JSON, or has a bad eos_token_id, is a one-line error."""
    import json

    from opd_jax.tasks import build_char_tokenizer, stop_ids

    tok = build_char_tokenizer(None)
    i = tok.convert_tokens_to_ids
    student = save_model(rigged_model({i("="): i("4"), i("4"): i("2"), i("2"): i("z"), i("z"): tok.eos_token_id}),
                         tmp_path / "rigged")
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "add:40+2=", "domain": "math", "answer": "42"}))

    tok_dir = char_tokenizer_dir(tmp_path / "tok")

    def trainer(run):
        return build_run(load_config(None, tiny_overrides(tmp_path / run, **{
            "student.path": str(student), "student.init": "{}", "data.path": str(data), "data.domains": "[]",
            "data.tokenizer": str(tok_dir),
            "teachers": f"[{{name: t, path: {student}}}]", "routing": "{math: t}", "train.eval_per_domain": 2,
            "data.max_new_tokens": 6})))

    def rewards(tr):
        return tr.rollouts.on_policy(tr.init.params, tr.source.batch(0, tr.cfg.data.per_domain), jax.random.key(0))[3]

    def accuracy(tr):
        return tr.rollouts.evaluate(tr.init.params, tr.eval_examples)[0]["math"]

    plain = trainer("plain")
    assert plain.rollouts.stop == (tok.eos_token_id,)
    assert not rewards(plain).any() and accuracy(plain) == 0.0
    (student / "generation_config.json").write_text(json.dumps({"eos_token_id": [i("z"), tok.eos_token_id]}))
    tr = trainer("stops")
    assert tr.rollouts.stop == tuple(sorted({i("z"), tok.eos_token_id}))
    assert rewards(tr).all() and accuracy(tr) == 1.0
    for bad, msg in (("{not json", "is not a JSON object"), ('{"eos_token_id": "x"}', "eos_token_id must be")):
        (student / "generation_config.json").write_text(bad)
        with pytest.raises(opd_jax.OpdError, match=msg):
            stop_ids(tok, student)
