"""The memory planner against exact counts, and the trainer's refusal to start a run that cannot fit."""

import pytest

from opd_jax import OpdError
from opd_jax.config import load_config
from opd_jax.plan import GiB, plan
from conftest import TINY, tiny_overrides

# Qwen3-8B's shape (config.json of the released model): nothing of this size is allocated here
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                num_kv_heads=8, head_dim=128, max_position_embeddings=40960)


def qwen3_8b_counts():
    """(all parameters, norm parameters) of Qwen3-8B counted by hand, untied embeddings."""
    V, D, F, L, H, K, Dh = 151936, 4096, 12288, 36, 32, 8, 128
    per_layer = D * H * Dh * 2 + D * K * Dh * 2 + 3 * D * F + 2 * D + 2 * Dh  # q,o + k,v + mlp + 2 norms + q/k norm
    norms = L * (2 * D + 2 * Dh) + D
    return 2 * V * D + L * per_layer + D, norms


def _cfg(**extra):
    init = "{" + ", ".join(f"{k}: {v}" for k, v in QWEN3_8B.items()) + "}"
    base = {"student.init": init, "student.dtype": "bfloat16", "teachers": "[{name: big, path: self}]",
            "routing": "{addition: big, reverse: big, sort: big}", "data.per_domain": 2, "optim.name": "adamw"}
    return load_config(None, [f"{k}={v}" for k, v in {**base, **extra}.items()])


def test_qwen3_8b_parameter_and_optimizer_bytes_match_an_exact_count():
    total, norms = qwen3_8b_counts()
    assert total == 8_190_735_360  # the published parameter count of Qwen3-8B
    one = plan(_cfg(**{"mesh.fsdp": 1}), n_devices=1)
    assert one.student_params == total
    assert one.student_bytes_per_device == 2 * total  # bfloat16
    # AdamW keeps two moments in the parameter dtype, plus a step count or two (int32)
    assert 0 <= one.optimizer_bytes_per_device - 4 * total <= 16
    for shape in ((1, 8, 1), (1, 2, 4), (2, 2, 2)):
        p = plan(_cfg(**{"mesh.data": shape[0], "mesh.fsdp": shape[1], "mesh.tensor": shape[2]}), n_devices=8)
        split = 8 // shape[0]  # data-parallel replicas hold whole copies of their slice
        expect = 2 * ((total - norms) / split + norms)  # every matrix divides; norms are replicated
        assert p.student_bytes_per_device == pytest.approx(expect, rel=1e-12), shape
        assert 0 <= p.optimizer_bytes_per_device - 2 * expect <= 16
        assert p.teachers["big"]["params"] == total
    sgd = plan(_cfg(**{"optim.name": "sgd", "mesh.fsdp": 1}), n_devices=1)
    assert 0 <= sgd.optimizer_bytes_per_device - 2 * total <= 16  # one momentum buffer


def test_compiled_plan_reports_activations_and_flops_that_scale_with_the_batch():
    # rows 24 and 48 both split over the 8 devices (rows that do not divide are replicated instead)
    small = plan(load_config(None, tiny_overrides("/tmp/unused", **{"data.per_domain": 4})), n_devices=8, flops=True)
    large = plan(load_config(None, tiny_overrides("/tmp/unused", **{"data.per_domain": 8})), n_devices=8, flops=True)
    assert small.activation_bytes_per_device > 0 and small.flops_per_step_per_device > 0
    assert 1.7 < large.flops_per_step_per_device / small.flops_per_step_per_device < 2.3
    assert large.rows_per_step == 2 * small.rows_per_step == 48  # 3 domains x 8 prompts x 2 samples
    # every layer counts (the layer loop is unrolled for the cost analysis): 4 layers cost far more than 2
    deep = plan(load_config(None, tiny_overrides("/tmp/unused", **{"data.per_domain": 4, "student.init": TINY.replace(
        "num_layers: 2", "num_layers: 4")})), n_devices=8, flops=True)
    assert deep.flops_per_step_per_device / small.flops_per_step_per_device > 1.5


def test_trainer_refuses_a_run_that_cannot_fit(tmp_path):
    from opd_jax.train import train

    cfg = load_config(None, tiny_overrides(tmp_path / "r", **{"mesh.device_memory_gb": 1e-6}))
    with pytest.raises(OpdError, match=r"needs about .* GiB per device \(.*activations [0-9.]+\).*train\.remat.*"
                                       r"train\.micro_batch.*loss\.seq_chunk.*shard wider") as e:
        train(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "r").exists()  # refused before writing anything


def test_micro_batch_auto_picks_the_largest_that_fits(tmp_path):
    """48 rows (3 domains x 8 prompts x 2 samples) on 8 devices: the candidates are all rows, then the
    multiples of 8 (one row per device at least) and of the group size 2 that divide 48: 24, 16, 8.
    With a device memory between the plans of 24 and 16 rows, auto picks 16, and the trainer runs it."""
    from opd_jax.plan import fit_micro_batch, micro_batch_candidates
    from opd_jax.run import build_run

    over = {"data.per_domain": 8, "data.max_new_tokens": 24, "train.remat": "none", "student.init": TINY.replace(
        "num_layers: 2", "num_layers: 4")}
    base = load_config(None, tiny_overrides(tmp_path / "r", **over))
    assert micro_batch_candidates(base, 8) == [0, 24, 16, 8]
    need = {m: plan(load_config(None, tiny_overrides(tmp_path / "r", **over, **{"train.micro_batch": m})),
                    n_devices=8, compile=True).total_bytes_per_device for m in (0, 24, 16, 8)}
    assert need[0] > need[24] > need[16] > need[8]
    gb = (need[24] + need[16]) / 2 / GiB
    auto = load_config(None, tiny_overrides(tmp_path / "r", **over, **{"train.micro_batch": "auto",
                                                                         "mesh.device_memory_gb": gb}))
    run = build_run(auto)  # its fit check tries all rows, 24, then 16, and runs the one that fits
    assert run.micro == 16 and run.plan.total_bytes_per_device == need[16]
    tight = load_config(None, tiny_overrides(tmp_path / "r", **over, **{"train.micro_batch": "auto",
                                                                          "mesh.device_memory_gb": need[8] / 2 / GiB}))
    with pytest.raises(OpdError, match=r"train\.micro_batch \(now 8 of 48 rows"):
        fit_micro_batch(tight, 8)


def test_plan_cli_prints_the_table_and_the_verdict(capsys):
    from opd_jax.cli import main

    init = "{" + ", ".join(f"{k}: {v}" for k, v in QWEN3_8B.items()) + "}"
    assert main(["plan", f"student.init={init}", "student.dtype=bfloat16", "teachers=[{name: t, path: self}]",
                 "routing={addition: t, reverse: t, sort: t}", "mesh.device_memory_gb=4"]) == 0
    out = capsys.readouterr().out
    assert "8.191 B params" in out and "does NOT fit" in out


def test_micro_batches_and_remat_lower_the_compiled_activations():
    """The planner compiles the trainer's own step, so its knobs show: 48 rows in micro-batches of 16
    need less temporary memory than all at once, and rematerialised layers less than kept ones."""
    def act(**kw):
        over = {"data.per_domain": 8, "data.max_new_tokens": 24, "student.init": TINY.replace(
            "num_layers: 2", "num_layers: 4"), **kw}
        return plan(load_config(None, tiny_overrides("/tmp/unused", **over)), n_devices=8,
                    compile=True).activation_bytes_per_device

    whole = act(**{"train.remat": "none"})
    assert act(**{"train.remat": "none", "train.micro_batch": 16}) < 0.8 * whole  # 2 rows a device, not 6
    assert act(**{"train.remat": "full"}) < whole


def test_the_fit_check_measures_and_the_trainer_runs_one_compiled_update(tmp_path):
    """With a known device memory the run's fit check compiles the update from shapes; the loop then
    runs that very executable: the update is traced once in all (build and three steps), and the fit
    check's bytes equal `opd-jax plan --compile`'s."""
    from opd_jax import train_step
    from opd_jax.run import build_run
    from conftest import run_steps

    cfg = load_config(None, tiny_overrides(tmp_path / "r", **{"mesh.device_memory_gb": 64}))
    want = plan(cfg, n_devices=8, compile=True)
    traces = train_step.TRACES["update"]
    run = build_run(cfg)
    assert train_step.TRACES["update"] - traces == 1
    run_steps(run, 3)
    assert train_step.TRACES["update"] - traces == 1
    # the figures are XLA's own for the executable the loop runs (not the planner's arithmetic)
    mem = run.update.full.compiled.memory_analysis()
    assert want.compiled_argument_bytes_per_device == mem.argument_size_in_bytes > 0
    assert want.activation_bytes_per_device == mem.temp_size_in_bytes > 0
    assert run.plan.total_bytes_per_device == want.total_bytes_per_device
    # the compiled total: the teachers + the larger of the two phases, which never overlap: the update's own
    # arguments + temporaries, or the rollout's (training state, rollout weight copy, slots, prompts, temporaries)
    update = mem.argument_size_in_bytes + mem.temp_size_in_bytes
    rollout = (want.student_bytes_per_device + want.optimizer_bytes_per_device
               + want.rollout_weight_bytes_per_device + want.slot_bytes_per_device
               + want.prompt_store_bytes_per_device + want.rollout_temp_bytes_per_device)
    assert want.total_bytes_per_device == want.teacher_bytes_per_device + max(update, rollout)
    assert want.rollout_weight_bytes_per_device == want.student_weight_bytes  # whole on every chip (tensor 1)


def test_a_gkd_run_is_planned_with_both_of_its_parts(tmp_path):
    """loss.lam < 1 feeds the update on-policy samples and dataset answers: both parts are compiled, so
    the arguments grow by the off-policy rows (tokens, masks, teacher outputs) and the temporaries by
    their second forward/backward."""
    on = plan(load_config(None, tiny_overrides(tmp_path / "r")), n_devices=8, compile=True)
    both = plan(load_config(None, tiny_overrides(tmp_path / "r", **{"loss.lam": 0.5})), n_devices=8, compile=True)
    assert both.compiled_argument_bytes_per_device > on.compiled_argument_bytes_per_device
    assert both.activation_bytes_per_device >= on.activation_bytes_per_device
    # pure reward RL loads no teacher: none is planned
    grpo = plan(load_config(None, tiny_overrides(tmp_path / "r", **{
        "loss.estimator_type": "sampled", "loss.rl_alpha": 0.0})), n_devices=8)
    assert grpo.teachers == {} and grpo.teacher_bytes_per_device == 0


def test_plan_refuses_a_run_without_teachers_in_one_line():
    """A distillation config whose domains have no teacher gets the trainer's routing error from the
    planner too (it crashed inside the compile before)."""
    from opd_jax.errors import OpdError

    with pytest.raises(OpdError, match="domain 'addition' has no teacher in routing"):
        plan(load_config(None, ["student.init.vocab_size=64"]), n_devices=8, compile=True)


def test_flops_count_every_micro_batch():
    """XLA's cost analysis counts a loop body once: the FLOP count unrolls the micro-batch loop as well as
    the layers, so the same step in micro-batches of 8 rows costs what it costs in one (within the few
    percent the per-micro-batch normalisation adds), not an eighth-ish of it."""
    def flops(**kw):
        over = {"data.per_domain": 8, "data.max_new_tokens": 16, **kw}
        return plan(load_config(None, tiny_overrides("/tmp/unused", **over)), n_devices=1,
                    flops=True).flops_per_step_per_device

    whole, micro = flops(), flops(**{"train.micro_batch": 8})
    assert micro == pytest.approx(whole, rel=0.05)
