"""LoRA (`opd_jax.lora`, student.lora): adapters against PEFT's torch implementation, only the adapters
train, the base as a free teacher, and the export round trip (PEFT folder and merged weights)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from opd_jax import lora
from opd_jax.config import load_config
from opd_jax.errors import OpdError
from opd_jax.models import load_model, save_model

from conftest import char_tokenizer_dir, host, random_teacher, run_steps, tiny_model, tiny_overrides

LORA = "{rank: 4, alpha: 8}"


def _torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _ids(seed=0, shape=(2, 9)):
    return np.random.RandomState(seed).randint(3, 60, shape)


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])  # q/k norm; q/k/v bias (Llama has neither)
def test_peft_loads_our_adapters_and_gives_our_logits(tmp_path, family):
    """Adapters with random A and B (B is zero at init) on every projection, written under PEFT's names:
    transformers + PEFT's PeftModel give the logits of opd_jax's adapted forward (and not the base's)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_model(3, family=family)
    save_model(model, tmp_path / "base")
    lora.add_adapters(model, 4, 8.0, tuple(lora.TARGETS.values()), seed=1)
    for i, name in enumerate(model.cfg.lora_targets):
        b = getattr(model.layers, name + "_lora_b")
        b[...] = 0.3 * jax.random.normal(jax.random.key(i), b[...].shape)
    params = nnx.to_pure_dict(nnx.state(model))
    (tmp_path / "adapter").mkdir()
    save_file(lora.peft_tensors(params, model.cfg), tmp_path / "adapter" / "adapter_model.safetensors")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(lora.peft_config(model.cfg)))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    ids = _ids()
    plain = _torch_logits(base, ids)
    ref = _torch_logits(PeftModel.from_pretrained(base, tmp_path / "adapter"), ids)
    ours = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(ref - plain).max() > 1e-2  # the adapters change the logits
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def _run(tmp_path, name, teachers=None, **extra):
    from opd_jax.run import build_run

    student = char_tokenizer_dir(tiny_model(5, folder=tmp_path / "student"))
    over = {"student.path": str(student), "student.init": "{}", "student.lora": LORA, **(teachers or random_teacher(tmp_path)),
            **extra}
    return build_run(load_config(None, tiny_overrides(tmp_path / name, **over))), student


@pytest.mark.parametrize("extra", [{"optim.effopd_window": 2}, {"train.max_staleness": 1}],
                         ids=["sync-effopd", "async"])
def test_only_the_adapters_train_and_the_base_is_bit_equal(tmp_path, extra):
    """Three AdamW steps (synchronous with EffOPD extrapolating the adapters every 2 steps; one step
    stale: the sampler runs base + adapters of the version before): every base weight is bit-equal to the folder's, every adapter moved, and the optimizer state
    holds the adapters' moments only."""
    run, folder = _run(tmp_path, "r", **extra)
    before = host(run.init.params)
    state, rec = run_steps(run, 3)
    after = host(state.params)
    adapters, base = lora.split(after)
    start_adapters, start_base = lora.split(before)
    jax.tree.map(np.testing.assert_array_equal, base, start_base)
    plain = nnx.to_pure_dict(nnx.state(load_model(folder)))
    jax.tree.map(np.testing.assert_array_equal, base, jax.tree.map(np.asarray, plain))
    assert len(adapters["layers"]) == 14  # A and B on q, k, v, o, gate, up, down
    for k, v in adapters["layers"].items():
        assert np.abs(v - start_adapters["layers"][k]).max() > 0, k
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 1]
    shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(adapters))
    k = len(moments) // len(shapes)  # Adam's mu and nu (and EffOPD's window directions) of the adapters alone
    assert k >= 2 and sorted(tuple(x.shape) for x in moments) == sorted(shapes * k)
    assert np.isfinite(rec["loss"]) and rec["grad_norm"] > 0


def test_a_base_teacher_is_the_student_at_step_0_and_the_base_after(tmp_path):
    """teachers [{path: base}]: at step 0 (B = 0) its hidden states are the student's own; after two steps
    they are still the base folder's forward (loaded on its own), while the student's have moved."""
    teachers = {"teachers": "[{name: b, path: base}]", "routing": "{addition: b, reverse: b, sort: b}"}
    run, folder = _run(tmp_path, "base", teachers=teachers, **{"optim.lr": 0.05})
    batch = run.rollouts.collect(0, run.init)
    on = jax.tree.map(np.asarray, batch.arrays["on"])
    P = run.cfg.data.max_prompt_len
    full = np.concatenate([on.prompt_mask, on.mask], 1)
    student = nnx.merge(run.graphdef, run.init.params)
    m = np.asarray(on.mask)[..., None] > 0
    t0 = np.asarray(on.teacher["b"])
    np.testing.assert_allclose(t0 * m, np.asarray(student.completion_hidden(on.tokens, full, P)) * m, atol=1e-6)
    state, rec = run_steps(run, 2)
    b = run.rollouts.collect(2, state)
    on = jax.tree.map(np.asarray, b.arrays["on"])
    full, m = np.concatenate([on.prompt_mask, on.mask], 1), on.mask[..., None] > 0
    ref = np.asarray(load_model(folder).completion_hidden(on.tokens, full, P))
    now = np.asarray(nnx.merge(run.graphdef, state.params).completion_hidden(on.tokens, full, P))
    np.testing.assert_allclose(np.asarray(on.teacher["b"]) * m, ref * m, atol=1e-5)
    assert np.abs((now - ref) * m).max() > 1e-4  # the student has moved away from its base


def test_export_lora_and_merge_round_trip(tmp_path, capsys):
    """After two steps: `opd-jax export --lora` loads in PEFT on the base folder, `--merge` in transformers
    alone, and both give the logits of the run's own adapted forward; each merged weight is the base's plus
    (alpha / r) lora_B @ lora_A read from the PEFT file. A plain export of a LoRA run is refused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from opd_jax.cli import main
    from opd_jax.export import load_run_model

    run, folder = _run(tmp_path, "r", **{"train.steps": 2, "train.checkpoint_every": 2, "optim.lr": 0.05})
    from opd_jax.train import train
    train(run.cfg)
    out = tmp_path / "r"
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "plain")]) == 2
    assert "trained LoRA adapters (student.lora): pass --lora" in capsys.readouterr().err
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "peft"), "--lora"]) == 0
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    ids = _ids(1)
    ours = np.asarray(load_run_model(out)(jnp.asarray(ids)))
    base = AutoModelForCausalLM.from_pretrained(folder)
    plain = _torch_logits(base, ids)
    peft = _torch_logits(PeftModel.from_pretrained(base, tmp_path / "peft"), ids)
    merged = _torch_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids)
    assert np.abs(ours - plain).max() > 1e-3  # two steps moved the adapters
    np.testing.assert_allclose(peft, ours, atol=2e-5)
    np.testing.assert_allclose(merged, ours, atol=2e-5)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ad, w0, w1 = (load_file(p) for p in (tmp_path / "peft" / "adapter_model.safetensors",
                                         folder / "model.safetensors", tmp_path / "merged" / "model.safetensors"))
    for i in range(2):
        for module in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            stem = f"model.layers.{i}.{module}"
            a, b = ad[f"base_model.model.{stem}.lora_A.weight"], ad[f"base_model.model.{stem}.lora_B.weight"]
            want = w0[f"{stem}.weight"] + cfg["lora_alpha"] / cfg["r"] * b @ a
            np.testing.assert_allclose(w1[f"{stem}.weight"], want, atol=1e-6)
    # `opd-jax analyze` sees the merged update: of rank 4 (the adapters' rank) in every adapted matrix
    assert main(["analyze", "--before", str(folder), "--after", str(out), "--out", str(tmp_path / "an")]) == 0
    matrices = json.loads((tmp_path / "an" / "analysis.json").read_text())["matrices"]
    adapted = [m for m in matrices if m["name"] in lora.PEFT_MODULES]
    assert len(adapted) == 14
    for m in adapted:
        sv = np.asarray(m["singular_values"])
        assert sv[3] > 1e-3 * sv[0] and (sv[4:] < 1e-5 * sv[0]).all(), m["name"]


@pytest.mark.parametrize("extra, message", [
    ({"student.lora": "{rank: 0}"}, "student.lora.rank must be a positive integer"),
    ({"student.lora": "{rank: 4, targets: [q, lm_head]}"}, "unknown target 'lm_head'"),
    ({"student.lora": "{rank: 4, dropout: 0.1}"}, "unknown key 'dropout'"),
    ({"student.lora": "{rank: 4, alpha: -1}"}, "alpha must be a positive number"),
    ({"teachers": "[{name: b, path: base}]", "routing": "{addition: b, reverse: b, sort: b}"},
     "has path: base .* but student.lora is not set"),
    ({"student.lora": "{rank: 4}", "optim.mask": "m.safetensors"}, "student.lora does not support optim.mask"),
    ({"student.lora": "{rank: 4}", "optim.effopd_window": 2, "optim.effopd_guard": "true"},
     "student.lora does not support the EffOPD guard"),
    ({"student.lora": "{rank: 4}", "teachers": "[{name: b, path: base}]", "routing": "{addition: b, reverse: b, sort: b}",
      "train.max_staleness": 1}, "is base .* cannot be used with train.max_staleness"),
])
def test_bad_lora_settings_are_refused_in_one_line(tmp_path, extra, message):
    from opd_jax.checks import check

    cfg = load_config(None, tiny_overrides(tmp_path / "r", **extra))
    with pytest.raises(OpdError, match=message) as err:
        check(cfg)
    assert "\n" not in str(err.value)


def test_a_packed_lora_run_resumes_to_the_uninterrupted_one(tmp_path):
    """student.lora with data.pack_tokens: a run stopped after 2 of 3 steps and resumed ends at the
    uninterrupted run's parameters bit for bit (k = 0: asynchronous runs do not resume bit for bit,
    docs/training.md), and its base is the folder's."""
    from opd_jax.export import restore_run_params
    from opd_jax.train import train

    student = char_tokenizer_dir(tiny_model(5, folder=tmp_path / "student"))
    over = {"student.path": str(student), "student.init": "{}", "student.lora": LORA, **random_teacher(tmp_path),
            "train.steps": 3, "train.checkpoint_every": 1, "data.pack_tokens": 64,
            "optim.lr": 0.05}
    cfgs = {name: load_config(None, tiny_overrides(tmp_path / name, **over)) for name in ("straight", "resumed")}
    train(cfgs["straight"])
    train(cfgs["resumed"], stop_after=2)
    train(cfgs["resumed"], resume=True)
    (_, a, sa), (_, b, sb) = (restore_run_params(tmp_path / n) for n in ("straight", "resumed"))
    assert sa == sb == 3
    jax.tree.map(np.testing.assert_array_equal, b, a)
    plain = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_model(student))))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, lora.split(b)[1]), plain)
    start = lora.split(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(
        lora.add_adapters(load_model(student), 4, 8.0, tuple(lora.TARGETS.values()), seed=0)))))[0]
    assert np.abs(b["layers"]["wq_lora_b"] - start["layers"]["wq_lora_b"]).max() > 0  # the adapters trained


def test_the_docs_lora_example_runs_as_written(tmp_path):
    """docs/training.md's "LoRA adapters" block, as written: a LoRA run against a teacher, a base-teacher
    context-distillation run (the base with an instruction the student does not see: a divergence above 0
    at step 0, where the adapters are still zero), and the PEFT export."""
    from conftest import run_readme_block

    run_readme_block("## LoRA adapters", ("lora_example.yaml", "lora_self_context.yaml"), tmp_path,
                     doc="docs/training.md")
    first = json.loads((tmp_path / "runs/lora_self/metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["on_policy/divergence"] > 1e-4
    peft = tmp_path / "runs/lora_opd/peft"
    assert json.loads((peft / "adapter_config.json").read_text())["r"] == 8
    assert len(load_file(peft / "adapter_model.safetensors")) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    blocks = [re.search(r"```bash\n(.*?)```", (root / doc).read_text().split(heading)[1], re.S).group(1)
              for doc, heading in (("README.md", "## LoRA"), ("docs/training.md", "## LoRA adapters"))]
    assert blocks[0] == blocks[1]  # the README shows the block run here


def test_a_bfloat16_base_keeps_float32_adapters_and_trains(tmp_path):
    """student.dtype bfloat16: the base stays bfloat16 (and bit-equal), the adapters and AdamW's moments are
    float32, and two steps move the adapters."""
    run, _ = _run(tmp_path, "bf16", **{"student.dtype": "bfloat16"})
    before = host(run.init.params)
    state, rec = run_steps(run, 2)
    adapters, base = lora.split(host(state.params))
    assert {x.dtype for x in jax.tree.leaves(base)} == {np.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {np.dtype(np.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 1} == {np.dtype(np.float32)}
    jax.tree.map(np.testing.assert_array_equal, base, lora.split(before)[1])
    assert np.abs(adapters["layers"]["w_up_lora_b"]).max() > 0 and np.isfinite(rec["loss"])


def test_a_lora_run_with_its_sampler_and_teacher_on_their_own_devices_trains_like_colocated(tmp_path):
    """mesh.roles: the sampler receives base + adapters on devices 4-7 (the teacher there too): after two
    steps the losses and parameters equal the co-located LoRA run's."""
    ref, _ = _run(tmp_path, "a", **{"mesh.roles": "{learner: 0-3}"})
    run, _ = _run(tmp_path, "b", **{"mesh.roles": "{learner: 0-3, t: 4-7, sampler: 4-7}"})
    (s0, r0), (s1, r1) = run_steps(ref, 2), run_steps(run, 2)
    np.testing.assert_allclose(r1["loss"], r0["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), host(s1.params), host(s0.params))
    assert np.abs(host(s1.params)["layers"]["wq_lora_b"]).max() > 0
