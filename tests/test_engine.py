"""The rollout engine: slots that refill never change a sequence, one prefill per prompt, a rollout
layout that moves no weights, refill order and occupancy by hand count, one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opd_jax
from opd_jax import sharding as shd
from opd_jax.engine import Engine, EngineSpec
from opd_jax.rollout_programs import decode, empty, prefill, whole_rollout
from opd_jax.models import ModelConfig, init_model
from opd_jax.roofline import collective_bytes
from references import left_padded_prompts


def _prompts(seed=0, b=8, p=7, vocab=64):
    """Left-padded prompts of mixed lengths (1 to p real tokens)."""
    return left_padded_prompts(seed, b, p, vocab, min_real=1)


@pytest.fixture(scope="module")
def small():
    return init_model(ModelConfig.for_family("qwen3", vocab_size=64, num_heads=8, num_kv_heads=4), seed=2)


def _arrays(roll):
    return [np.asarray(x) for x in (roll.tokens, roll.logprobs, roll.mask)]


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_k=40, top_p=0.95)],
                         ids=["greedy", "temperature-top-k-top-p"])
def test_fewer_slots_give_every_sequence_the_same_tokens(small, sampling):
    """3 slots refilled as sequences end (several stop ids, mixed prompt lengths) give each row the
    tokens, log-probs and mask of one slot per row: a sequence draws from its own key. Decode with the
    layers' weights split outside the loop (the CPU default) or read from the stacked weights in place
    (`EngineSpec.split_layers`) gives the same sequences."""
    ids, mask = _prompts()
    kw = dict(key=jax.random.key(5), max_new_tokens=12, eos_id=[3, 4, 5, 6, 7, 8], **sampling)
    ref = _arrays(opd_jax.generate(small, ids, mask, **kw))
    lengths = ref[2].sum(1)
    if sampling["temperature"]:
        assert lengths.min() < 12 and lengths.max() == 12  # rows end at a stop id and at the cap
    for slots, per_call, split in ((3, 1, True), (3, 4, False), (5, 8, True), (None, 8, False)):
        got = _arrays(opd_jax.generate(small, ids, mask, slots=slots, steps_per_call=per_call, split_layers=split,
                                       **kw))
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_allclose(got[1], ref[1], atol=1e-6)
        np.testing.assert_array_equal(got[2], ref[2])


def test_sampled_logprobs_with_refilled_slots_equal_a_plain_forward(small):
    """With 3 slots for 8 rows, each sampled token's log-prob equals log_softmax(logits / T) of a plain
    forward pass over the whole rollout (no cache, no slots)."""
    ids, mask = _prompts(seed=1)
    t = 0.8
    roll = opd_jax.generate(small, ids, mask, key=jax.random.key(2), max_new_tokens=10, temperature=t,
                            eos_id=[5, 7], slots=3, steps_per_call=2)
    tokens, lp, m = _arrays(roll)
    full = np.concatenate([mask, m], 1)
    logits = np.asarray(small(jnp.asarray(tokens), jnp.asarray(full)), np.float64) / t
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    p = ids.shape[1]
    want = np.take_along_axis(logp[:, p - 1:-1], tokens[:, p:, None], -1)[..., 0]
    np.testing.assert_allclose(lp * m, want * m, atol=1e-4)
    assert m.sum() > 2 * len(ids)


def test_one_prefill_per_prompt_equals_separate_prefills(small):
    """group=3 prefills each prompt once and copies its KV into its samples' slots: the rows equal three
    separate copies of each prompt; the compiled prefill's FLOPs fall about 3-fold."""
    ids, mask = _prompts(seed=3, b=4)
    kw = dict(key=jax.random.key(9), max_new_tokens=8, temperature=1.0, eos_id=[5])
    shared = _arrays(opd_jax.generate(small, ids, mask, group=3, slots=5, **kw))
    separate = _arrays(opd_jax.generate(small, np.repeat(ids, 3, 0), np.repeat(mask, 3, 0), **kw))
    for a, b in zip(shared, separate):
        np.testing.assert_allclose(a, b, atol=1e-6)
    from flax import nnx
    graphdef, state = nnx.split(small)
    params = nnx.to_pure_dict(state)

    def flops(n):
        x = jax.ShapeDtypeStruct((n, ids.shape[1]), jnp.int32)
        cost = prefill.lower(graphdef, params, x, x, mesh=None, rules=None).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    assert flops(12) / flops(4) == pytest.approx(3.0, rel=0.1)
    import opd_jax.stream as stream_mod

    seen, real = [], stream_mod.prefill  # what the slot loop actually hands its prefill program
    stream_mod.prefill = lambda graphdef, params, ids, pmask, **kw: seen.append(ids.shape[0]) or real(
        graphdef, params, ids, pmask, **kw)
    try:
        engine = Engine(graphdef, small.cfg, EngineSpec(prompt_len=ids.shape[1], max_new_tokens=8, slots=5))
        _, stats = engine.run(params, ids, mask, jax.random.key(0), group=3)
    finally:
        stream_mod.prefill = real
    assert seen == [4] and stats.prefill_rows == 4  # one call over the 4 prompts, not 12 rows


def test_collective_bytes_follow_loops_by_hand_count():
    """The HLO reader counts a collective once per execution of every loop around it (trip counts)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = shd.make_mesh((1, 8, 1))
    x = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))

    def f(x):
        def body(i, y):  # gathers the carried y (8 KiB per device), then keeps its own rows again
            full = jax.lax.with_sharding_constraint(jnp.sin(y), NamedSharding(mesh, P()))
            return jax.lax.with_sharding_constraint(full * 2.0, NamedSharding(mesh, P("fsdp")))
        return jax.lax.fori_loop(0, 5, body, x)

    text = jax.jit(f).lower(x).compile().as_text()
    assert text.count("all-gather(") == 1  # one collective in the program text, run 5 times
    assert collective_bytes(text) == 5 * 64 * 32 * 4


def _decode_collectives(model, rules_name):
    from flax import nnx

    mesh = shd.make_mesh((1, 8, 1))
    rules = shd.rules_named(rules_name)
    graphdef, state = nnx.split(model)
    spec = EngineSpec(prompt_len=8, max_new_tokens=16, slots=16, steps_per_call=1)
    engine = Engine(graphdef, model.cfg, spec, mesh, rules)
    params = engine.place(nnx.to_pure_dict(state))
    rt = tuple(sorted(rules.items()))
    slots = empty(cfg=model.cfg, spec=spec, mesh=mesh, rules=rt)
    limit = jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(mesh))
    text = decode.lower(graphdef, params, slots, limit, spec=spec, mesh=mesh, rules=rt).compile().as_text()
    # the one-program rollout (a slot per row): prefill, KV copy and every decode step
    rows = lambda *tail: shd.rows_sharding(16, 1 + len(tail), mesh, rules)  # noqa: E731
    ids = jax.ShapeDtypeStruct((16, 8), jnp.int32, sharding=rows(8))
    whole = whole_rollout.lower(graphdef, params, ids, ids, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shd.replicated(mesh)),
                                jax.ShapeDtypeStruct((16,), jnp.int32, sharding=rows()), spec=spec, group=1, mesh=mesh,
                                rules=rt).compile().as_text()
    return collective_bytes(text), sum(x.nbytes for x in jax.tree.leaves(params)), text, whole


def test_the_rollout_layout_moves_no_weights_and_keeps_the_logits():
    """A decode step compiled in the training layout (FSDP) all-gathers the weights; in the rollout
    layout its collectives are under 0.1% of the weights' bytes and no all-gather is left. The
    sampled tokens and log-probs on the mesh equal the unsharded ones."""
    model = init_model(ModelConfig.for_family("qwen3", vocab_size=256, num_heads=8, num_kv_heads=4), seed=6)
    train, weights, _, train_whole = _decode_collectives(model, "default")
    rollout, _, text, whole = _decode_collectives(model, "rollout")
    assert train > 0.5 * weights  # the check sees weights cross the chips
    assert rollout < 1e-3 * weights and "all-gather" not in text
    assert "all-gather" in train_whole and "all-gather" not in whole  # the one-program rollout as well
    ids, mask = _prompts(seed=4, b=16, vocab=256)
    kw = dict(key=jax.random.key(1), max_new_tokens=8, temperature=1.0, eos_id=[3], slots=8)
    ref = _arrays(opd_jax.generate(model, ids, mask, **kw))
    mesh = shd.make_mesh((2, 2, 2))  # tensor 2: weights split over tensor only, rows over data x fsdp
    got = _arrays(opd_jax.generate(shd.shard_model(model, mesh), ids, mask, mesh=mesh, **kw))
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], atol=1e-5)


def test_refill_order_and_occupancy_match_a_hand_count():
    """A rigged model (next token = table[token]) ends each sequence at a known length: the chain from
    a prompt's last token reaches the stop id 2 after 3, 1, 2, 4, 1 tokens. Two slots, one step per
    call: by hand, rows come back in the order 1, 0, 2, 4, 3 after 7 decode steps; 11 tokens over
    2 x 7 slot-steps. Rows that end in the same call come back in the order they ended."""
    from conftest import rigged_model
    from flax import nnx

    model = rigged_model({10: 11, 11: 12, 12: 13, 13: 2})
    ids = np.array([[1, 11], [1, 13], [1, 12], [1, 10], [1, 13]])
    mask = np.ones_like(ids)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    spec = EngineSpec(prompt_len=2, max_new_tokens=6, slots=2, temperature=0.0, stop=(2,), steps_per_call=1)
    roll, stats = Engine(graphdef, model.cfg, spec).run(params, ids, mask, jax.random.key(0))
    assert stats.handed_back == [1, 0, 2, 4, 3]
    assert (stats.decode_steps, stats.generated) == (7, 11)
    # one step a call while sequences wait (3 calls), then nothing is queued: one call runs the last two out
    assert stats.dispatches == 4
    assert stats.occupancy == pytest.approx(11 / 14)
    np.testing.assert_array_equal(np.asarray(roll.mask).sum(1), [3, 1, 2, 4, 1])
    np.testing.assert_array_equal(np.asarray(roll.tokens)[0, 2:], [12, 13, 2, 0, 0, 0])
    # a static batch (one slot per row) runs until the longest row: 5 rows x 4 steps for 11 tokens
    static = Engine(graphdef, model.cfg, EngineSpec(**{**spec.__dict__, "slots": 5}))
    _, s5 = static.run(params, ids, mask, jax.random.key(0))
    assert (s5.decode_steps, s5.occupancy) == (4, pytest.approx(11 / 20))
    # length caps end a sequence too (no stop token in its mask)
    capped, s = Engine(graphdef, model.cfg, spec).run(params, ids, mask, jax.random.key(0), caps=[2, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(capped.mask).sum(1), [2, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(capped.tokens)[0, 2:4], [12, 13])
    # with 4 steps a call, a call stops at the first slot's cap so its slot refills at once: by hand,
    # 3 one-step calls (rows 0+1, then 0+2, then 3+4) instead of 4 steps with idle slot-steps
    _, s4 = Engine(graphdef, model.cfg, EngineSpec(**{**spec.__dict__, "steps_per_call": 4})).run(
        params, ids, mask, jax.random.key(0), caps=[2, 1, 1, 1, 1])
    assert (s4.decode_steps, s4.dispatches, s4.generated) == (3, 3, 6)


def test_bad_engine_input_is_a_one_line_error(small, tmp_path):
    from flax import nnx

    from conftest import tiny_overrides
    from opd_jax.config import load_config
    from opd_jax.errors import OpdError
    from opd_jax.run import build_run

    graphdef, state = nnx.split(small)
    params = nnx.to_pure_dict(state)
    ids, mask = _prompts(b=4)
    spec = EngineSpec(prompt_len=7, max_new_tokens=4, slots=2)
    with pytest.raises(OpdError, match="rollout slots must be >= 1, got 0"):
        Engine(graphdef, small.cfg, EngineSpec(prompt_len=7, max_new_tokens=4, slots=0))
    with pytest.raises(OpdError, match="rollout slots 9 exceed the 8 sequences to sample"):
        Engine(graphdef, small.cfg, EngineSpec(prompt_len=7, max_new_tokens=4, slots=9)).run(
            params, ids, mask, jax.random.key(0), group=2)
    with pytest.raises(OpdError, match=r"length caps must be 4 numbers in \[1, 4\]"):
        Engine(graphdef, small.cfg, spec).run(params, ids, mask, jax.random.key(0), caps=[1, 0, 2, 2])
    short = init_model(ModelConfig.for_family("qwen3", vocab_size=64, max_position_embeddings=10))
    with pytest.raises(OpdError, match="= 11 exceeds the model context 10"):
        opd_jax.generate(short, ids, mask, key=jax.random.key(0), max_new_tokens=4)
    with pytest.raises(OpdError, match="data.rollout_slots must be >= 1, or 0"):
        load_config(None, tiny_overrides(tmp_path / "r", **{"data.rollout_slots": -1}))
    with pytest.raises(OpdError, match="data.rollout_slots 13 exceeds the 12 rows sampled per step"):
        build_run(load_config(None, tiny_overrides(tmp_path / "r", **{"data.rollout_slots": 13})))
    assert not (tmp_path / "r").exists()  # refused before anything was written
