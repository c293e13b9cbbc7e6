"""`opd_jax.packing` and the packed forward: first-fit decreasing against a brute-force optimum, each
packed sequence equal to a forward pass of it alone (attention inside its segment, positions restarted),
and the packed loss and gradient equal to the padded ones."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax.batch import Part
from opd_jax.config import LossConfig
from opd_jax.errors import OpdError
from opd_jax.models.transformer import segment_positions, with_runtime
from opd_jax.packing import first_fit_decreasing, gather_tokens, pack_part, packed_part, plan_packing
from opd_jax.train_step import policy_loss

from conftest import assert_same_step, tiny_model


def _optimum(lengths, budget):
    """The fewest rows any assignment needs (brute force over every row label)."""
    n = len(lengths)
    for rows in range(1, n + 1):
        for labels in itertools.product(range(rows), repeat=n):
            load = np.bincount(labels, weights=lengths, minlength=rows)
            if load.max() <= budget:
                return rows
    return n


@pytest.mark.parametrize("seed", range(12))
def test_first_fit_decreasing_is_valid_near_optimal_and_first_fit(seed):
    rng = np.random.RandomState(seed)
    budget = int(rng.randint(8, 20))
    lengths = rng.randint(1, budget + 1, size=int(rng.randint(1, 7)))
    rows = first_fit_decreasing(lengths, budget)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # each sequence once
    assert all(sum(lengths[i] for i in r) <= budget for r in rows)
    assert len(rows) <= 11 / 9 * _optimum(lengths, budget) + 6 / 9  # FFD's bound
    # the definition, replayed: longest first, each into the first row that had room at that moment
    row_of = {i: r for r, members in enumerate(rows) for i in members}
    load = [0] * len(rows)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = row_of[i]
        assert all(load[e] + lengths[i] > budget for e in range(r)), "an earlier row had room"
        assert r == 0 or load[r - 1] > 0  # rows open in order
        load[r] += lengths[i]


def test_too_long_a_sequence_and_too_few_rows_are_one_line_errors():
    with pytest.raises(OpdError, match="sequence 1 has 9 tokens, more than the packing budget"):
        first_fit_decreasing([3, 9], 8)
    with pytest.raises(OpdError, match="need 2 packed rows of 8, more than the 1 compiled"):
        plan_packing(np.ones((2, 4)), np.ones((2, 3)), 8, rows=1)


def _padded(seed=0, n=5, P=6, N=7, vocab=64):
    """n sequences: prompts left-padded to P (1..P real), completions right-padded to N (1..N real)."""
    rng = np.random.RandomState(seed)
    p, c = rng.randint(1, P + 1, n), rng.randint(1, N + 1, n)
    tokens = rng.randint(3, vocab, (n, P + N)).astype(np.int32)
    pmask = (np.arange(P)[None] >= P - p[:, None]).astype(np.int32)
    mask = (np.arange(N)[None] < c[:, None]).astype(np.int32)
    tokens[:, :P] *= pmask
    tokens[:, P:] *= mask
    return tokens, pmask, mask


@pytest.mark.parametrize("attention", ["naive", "blockwise", "splash"])
def test_each_packed_sequence_equals_its_forward_alone(attention):
    """Positions restart and attention stays inside the segment: every real token's hidden state in the
    packed rows equals a forward pass over that sequence alone (no padding at all)."""
    model = with_runtime(tiny_model(3, family="qwen3", num_heads=4, num_kv_heads=2, max_position_embeddings=128),
                         attention=attention, attention_block=4)
    tokens, pmask, mask = _padded()
    pk = plan_packing(pmask, mask, 16)
    d = pack_part(pk, tokens, pmask, mask)
    assert pk.rows < tokens.shape[0]  # several sequences share a row
    packed = np.asarray(model.packed_hidden(jnp.asarray(d["tokens"]), jnp.asarray(d["segments"])))
    np.testing.assert_array_equal(np.asarray(segment_positions(jnp.asarray(d["segments"])))[d["segments"] > 0],
                                  d["positions"][d["segments"] > 0])  # derived on device = the host layout
    P = pmask.shape[1]
    for i in range(tokens.shape[0]):
        p, c = pmask[i].sum(), mask[i].sum()
        alone = np.concatenate([tokens[i, P - p:P], tokens[i, P:P + c]])[None]
        want = np.asarray(model.hidden_states(jnp.asarray(alone)))[0]
        got = packed[pk.row[i], pk.start[i]:pk.start[i] + p + c]
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"sequence {i}")
        # RoPE sees only position differences, so the hidden states above would survive a shifted start:
        # the restart itself is checked on the layout
        np.testing.assert_array_equal(d["positions"][pk.row[i], pk.start[i]:pk.start[i] + p + c], np.arange(p + c))


def test_a_token_does_not_see_the_other_sequences_of_its_row():
    model = tiny_model(4)
    tokens, pmask, mask = _padded(seed=1)
    pk = plan_packing(pmask, mask, 16)
    d = pack_part(pk, tokens, pmask, mask)
    run = lambda t: np.asarray(model.packed_hidden(jnp.asarray(t), jnp.asarray(d["segments"]),  # noqa: E731
                                                   jnp.asarray(d["positions"])))
    base = run(d["tokens"])
    other = d["tokens"].copy()
    row = pk.row[0]
    first, last = d["segments"][row] == 1, d["segments"][row] == d["segments"][row].max()
    assert d["segments"][row].max() >= 2  # the row holds another sequence to change
    other[row][last] = (other[row][last] + 7) % 60 + 3  # change the last sequence of the row
    changed = run(other)
    np.testing.assert_array_equal(changed[row][first], base[row][first])
    assert np.abs(changed[row][last] - base[row][last]).max() > 1e-3


def _teacher_outputs(teacher, part, P, packed):
    if packed:
        return teacher.packed_hidden(part.tokens, part.segments)[:, :-1]
    return teacher.completion_hidden(part.tokens, jnp.concatenate([part.prompt_mask, part.mask], 1), P)


SUMS = [("sampled", "token", {"level": "sequence"}), ("sampled", "sequence", {"level": "sequence", "baseline": "loo"}),
        ("sampled", "token", {"baseline": "loo"}), ("sampled", "token", {"rl_alpha": 0.5}),
        ("sampled", "sequence", {"rl_alpha": 0.3, "level": "sequence"}), ("sampled", "token", {"rl_mode": "replace"})]


@pytest.mark.parametrize("estimator,normalize,extra", [
    ("full", "token", {}), ("full", "sequence", {}), ("topk", "token", {}), ("topk", "sequence", {}),
    ("sampled", "token", {}), ("sampled", "sequence", {})] + SUMS)
def test_packed_loss_and_gradient_equal_the_padded_ones(estimator, normalize, extra):
    """Every estimator, and the sums that run along a sequence (sequence level's reward-to-go, the
    leave-one-out baseline, RL's group advantages gathered per sequence), on packed rows = on padded rows."""
    student, teacher = tiny_model(5, scale=2.0), tiny_model(6, scale=2.0)
    tokens, pmask, mask = _padded(seed=2, n=6)
    P = pmask.shape[1]
    lc = LossConfig(estimator_type=estimator, normalize=normalize, kind="forward_kl", topk=4, **extra)
    rng = np.random.RandomState(0)
    slp = rng.normal(-2.0, 0.5, mask.shape).astype(np.float32) * mask
    rewards = rng.rand(6).astype(np.float32)  # per sequence; groups of 2 (RL advantages)
    padded = Part(*(jnp.asarray(x) for x in (tokens, pmask, mask)), sampler_logprobs=jnp.asarray(slp),
                  rewards=jnp.asarray(rewards))
    host = Part(tokens, pmask, mask, sampler_logprobs=slp, rewards=rewards)
    pp, fraction, where = packed_part(host, 16, normalize=normalize)
    packed = jax.tree.map(jnp.asarray, pp)
    assert fraction > (pmask.sum() + mask.sum()) / tokens.size
    w_t = teacher.output_matrix()
    graphdef, params = nnx.split(student)

    def run(part, is_packed):
        if estimator == "sampled":  # the teacher's log-probs of the sampled tokens
            h = _teacher_outputs(teacher, part, P, is_packed)
            lp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w_t), -1)
            t_out = jnp.take_along_axis(lp, part.tokens[:, -part.mask.shape[1]:, None], -1)[..., 0]
            tw = None
        else:
            t_out, tw = _teacher_outputs(teacher, part, P, is_packed), w_t

        def loss(p):
            return policy_loss(nnx.merge(graphdef, p), part, lc, P, 2, 1.0, teacher=t_out, teacher_w=tw)
        return jax.value_and_grad(loss, has_aux=True)(params)

    (l0, m0), g0 = run(padded, False)
    (l1, m1), g1 = run(packed, True)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7), g1, g0)
    np.testing.assert_allclose(np.asarray(m1["row_divergence"]), np.asarray(m0["row_divergence"]), rtol=1e-5, atol=1e-6)
    assert float(m1["tokens"]) == float(m0.get("tokens", mask.sum())) == mask.sum()  # RL's padded metrics omit it
    # the per-token student log-probs come back to their padded places
    back = gather_tokens(where, np.asarray(packed.mask))
    np.testing.assert_array_equal(back, mask)


# ------------------------------------------------------------------------------------------ in a run

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny random teacher served over HTTP (opd_jax.teacher_server) -> its url."""
    from opd_jax.teacher_server import serve

    server = serve(tiny_model(11), 0)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _teachers(tmp_path, kind, url=None) -> dict:
    """The teachers of a step test: a random one; it and the student's snapshot by domain; a privileged one
    (OPSD: the answer in its prompt) and the snapshot; a served one."""
    from conftest import random_teacher

    teacher = random_teacher(tmp_path / "teacher")
    path = teacher["teachers"].split("path: ")[1].rstrip("}]")
    if kind == "two":
        return {"teachers": f"[{{name: t, path: {path}}}, {{name: snap, path: self}}]",
                "routing": "{addition: t, reverse: snap, sort: t}"}
    if kind == "privileged":
        return {"teachers": f"[{{name: t, path: {path}, privileged: answer, privileged_template: 'answer {{answer}}. "
                            "{prompt}'}, {name: snap, path: self}]", "routing": "{addition: t, reverse: snap, sort: t}"}
    if kind == "served":
        return {"teachers": f"[{{name: t, url: '{url}', retries: 1, timeout: 20}}]",
                "routing": "{addition: t, reverse: t, sort: t}"}
    return teacher


def _one_step(tmp_path, name, extra, teachers):
    from opd_jax.config import load_config

    from conftest import one_sgd_step, tiny_overrides

    over = tiny_overrides(tmp_path / name, **{"train.steps": 1, "optim.name": "sgd", "optim.lr": 1.0,
                                              **teachers, **extra})
    return one_sgd_step(load_config(None, over))


SAMPLED = {"loss.estimator_type": "sampled"}


@pytest.mark.parametrize("kind, extra", [
    ("random", {"loss.lam": 0.5, "loss.estimator_type": "topk"}), ("two", {"train.micro_batch": 2}),
    ("random", {**SAMPLED, "loss.level": "sequence", "loss.baseline": "loo", "loss.normalize": "sequence"}),
    ("random", {**SAMPLED, "loss.rl_alpha": 0.5, "train.micro_batch": 2}),
    ("privileged", {"train.micro_batch": 2}), ("served", {"loss.estimator_type": "topk", "loss.topk": 4})],
    ids=["gkd-topk", "two-teachers-full-micro", "sampled-sequence-level-loo", "rl-micro", "privileged-micro",
         "served-topk"])
def test_a_packed_training_step_equals_the_padded_one(tmp_path, request, kind, extra):
    """The same sampled rows (sampling does not depend on packing), scored by the teachers (local ones on the
    packed rows; privileged and served ones on the padded rows, their scores moved to the packed positions)
    and trained on packed rows: the logged loss and divergence and the SGD step (the gradient) equal the
    padded run's."""
    teachers = _teachers(tmp_path, kind, request.getfixturevalue("served") if kind == "served" else None)
    pad_run, pad, rec0, b0 = _one_step(tmp_path, "padded", extra, teachers)
    d = pad_run.cfg.data
    L = 2 * (d.max_prompt_len + d.max_new_tokens)
    run, packed, rec1, b1 = _one_step(tmp_path, "packed", {**extra, "data.pack_tokens": L}, teachers)
    assert_same_step((rec0, pad, b0), (rec1, packed, b1))
    on0, on1 = b0.arrays["on"], b1.arrays["on"]
    real = int(np.asarray(on0.prompt_mask).sum() + np.asarray(on0.mask).sum())
    assert rec0["update/real_token_fraction"] == pytest.approx(real / on0.tokens.size)  # counted by hand
    assert int((np.asarray(on1.segments) > 0).sum()) == real  # the same tokens, packed
    assert rec1["update/real_token_fraction"] == pytest.approx(real / on1.tokens.size)
    blocks = len(run.rows.domains)  # equal domain blocks, each a whole number of micro-batches
    assert on1.tokens.shape[1] == L and on1.tokens.shape[0] % (blocks * run.rollouts.pack_unit[0]) == 0


def test_a_budget_below_the_longest_sequence_is_refused_in_one_line(tmp_path):
    from opd_jax.checks import check
    from opd_jax.config import load_config

    from conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides(tmp_path / "r", **{"data.pack_tokens": 10}))
    with pytest.raises(OpdError, match="data.pack_tokens 10 is shorter than the longest sequence") as err:
        check(cfg)
    assert "\n" not in str(err.value)


def test_the_planner_compiles_the_packed_rows_of_a_length_mix(tmp_path):
    """plan(pack_lengths=): the update is compiled for the rows first fit gives a long-tailed mix, and its
    arguments are the padded plan's with the batch arrays swapped, counted here by hand (one device)."""
    from opd_jax.config import load_config
    from opd_jax.plan import plan

    from conftest import tiny_overrides

    over = {"data.max_new_tokens": 40, "data.max_prompt_len": 8, "data.per_domain": 4, "data.group_size": 2}
    P, N = 8, 40
    L = P + N
    padded = plan(load_config(None, tiny_overrides(tmp_path / "a", **over)), n_devices=1, compile=True)
    cfg = load_config(None, tiny_overrides(tmp_path / "b", **{**over, "data.pack_tokens": L}))
    packed = plan(cfg, n_devices=1, pack_lengths=(4, 20), compile=True)
    B = padded.rows_per_step
    R, width = packed.packed_rows["on"]
    assert width == L and R % 3 == 0 and R < B  # whole domain blocks, fewer rows than padded
    D = 32  # the tiny teacher's width (its hidden states are the hand-over)

    def batch_bytes(rows, n, packed_layout):
        per_token = (rows * n) * (4 + 4 * D + 4)  # mask, teacher hidden states, sampler log-probs
        if packed_layout:  # tokens [R, L], prompt mask [R, 1], segments [R, L], seq_index [R, L-1], seq_tokens [B]
            return per_token + rows * L * 4 * 2 + rows * 4 + rows * n * 4 + B * 4
        return per_token + rows * (P + n) * 4 + rows * P * 4 + rows * 4  # tokens, prompt mask, rewards

    rest = padded.compiled_argument_bytes_per_device - batch_bytes(B, N, False)
    assert packed.compiled_argument_bytes_per_device - batch_bytes(R, L - 1, True) == pytest.approx(rest, abs=64)
    assert packed.activation_bytes_per_device < padded.activation_bytes_per_device
