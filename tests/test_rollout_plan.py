"""`opd_jax.rollout_plan`: the rollout phase's figures against the compiled programs' own memory
analysis and a hand count of the KV cache, and `slots_that_fit` against a brute-force search."""

from types import SimpleNamespace

import jax
import pytest

from opd_jax import sharding as shd
from opd_jax.config import load_config
from opd_jax.models import ModelConfig
from opd_jax.rollout_plan import compile_rollout, slots_that_fit

from conftest import tiny_overrides


@pytest.mark.parametrize("slots", [0, 4])
def test_rollout_figures_are_the_compiled_programs_arguments(tmp_path, slots):
    """On one device: the decode program's arguments are the rollout weight copy, the slots and the step
    limit, the prefill's outputs are the prompt store; the slots hold at least the hand-counted KV cache
    (K and V, [S, L, P+N, K, Dh] float32) and grow with the slot count."""
    cfg = load_config(None, tiny_overrides(tmp_path / "r", **{"data.rollout_slots": slots}))
    scfg = ModelConfig(**cfg.student.init)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    rows, prompts = 12, 6
    ro = compile_rollout(cfg, scfg, rows, prompts, mesh)
    s = slots or rows
    dec, pre = ro["programs"]["decode"].memory_analysis(), ro["programs"]["prefill"].memory_analysis()
    assert ro["rollout_slots"] == s
    # the decode program's arguments: the weights, the slots and the call's step limit (an int32 scalar)
    assert ro["rollout_weight_bytes_per_device"] + ro["slot_bytes_per_device"] + 4 == dec.argument_size_in_bytes
    # XLA's output size adds the result tuple's table (8 bytes for each of the store's 4 arrays)
    assert 0 <= pre.output_size_in_bytes - ro["prompt_store_bytes_per_device"] <= 8 * 4
    assert ro["rollout_temp_bytes_per_device"] == max(p.memory_analysis().temp_size_in_bytes
                                                      for p in ro["programs"].values())
    d = cfg.data
    kv = 2 * s * scfg.num_layers * (d.max_prompt_len + d.max_new_tokens) * scfg.num_kv_heads * scfg.head_dim * 4
    assert kv <= ro["slot_bytes_per_device"] <= kv * 1.5


def _brute(per_slot, fixed, limit, rows, shards):
    """The largest n <= rows, a multiple of shards (or any n < shards when none is), with
    fixed + n * per_slot <= limit; 0 when none fits."""
    fits = [n for n in range(rows + 1) if fixed + n * per_slot <= limit and (n % shards == 0 or rows < shards)]
    return max(fits, default=0)


@pytest.mark.parametrize("per_slot,fixed,limit,rows,shards", [
    (10.0, 100.0, 185.0, 16, 4), (10.0, 100.0, 165.0, 16, 4), (1.0, 0.0, 13.0, 64, 8), (10.0, 100.0, 99.0, 16, 4), (10.0, 100.0, 1000.0, 16, 4),
    (3.0, 50.0, 80.0, 12, 1), (7.0, 0.0, 40.0, 2, 4), (5.0, 20.0, 61.0, 32, 8), (1.0, 0.0, 64.0, 64, 8)])
def test_slots_that_fit_against_a_brute_force_search(per_slot, fixed, limit, rows, shards):
    """A plan whose slot bytes scale with the slot count (compiled with 4 slots), teachers resident."""
    p = SimpleNamespace(rollout_slots=4, slot_bytes_per_device=4 * per_slot, rows_per_step=rows,
                        rollout_phase_bytes_per_device=fixed - 30.0 + 4 * per_slot, teacher_bytes_per_device=30.0)
    assert slots_that_fit(p, limit, shards) == _brute(per_slot, fixed, limit, rows, shards)
