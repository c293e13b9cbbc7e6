"""Test setup: 8 fake CPU devices (set before jax is imported) and tiny Hugging Face checkpoints."""

import os

# XLA:CPU spends far longer compiling these tiny programs than running them: the tests ask its LLVM backend
# for no optimisation (the HLO, its shardings and memory plans are the same; code generation is faster).
# Subprocesses the tests start add OPD_TEST_XLA_FLAGS to their own device count.
os.environ["OPD_TEST_XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + os.environ["OPD_TEST_XLA_FLAGS"]
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# no persistent XLA compilation cache in the tests: two clean-clone CI runs (2026-12-06, jax 0.10.2) died
# with a segmentation fault inside it, once reading a cached executable (test_roles) and once serialising
# one (test_opsd), each in build_run's compile of the update; JAX writes entries with a plain write_bytes
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import pytest  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_hf_config(family: str, **overrides):
    """A small random-weight config of each family (2 layers, width 64) as transformers builds it."""
    import transformers

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    if family == "llama":  # Llama 3 frequency scaling, untied head
        return transformers.LlamaConfig(**{"rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}, **kw})
    if family == "qwen2":  # q/k/v bias, tied embeddings
        return transformers.Qwen2Config(**{"tie_word_embeddings": True, **kw})
    if family == "qwen3":  # q/k norm, explicit head_dim != hidden/heads
        return transformers.Qwen3Config(**{"head_dim": 32, **kw})
    raise ValueError(family)


def make_hf_model(family: str, seed: int = 0, std: float = 0.2, **overrides):
    """A transformers torch model with random weights (std large enough for peaked, tie-free logits)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """family -> (folder written by save_pretrained, the torch model)."""
    out = {}
    for fam in FAMILIES:
        model = make_hf_model(fam)
        folder = tmp_path_factory.mktemp(f"hf_{fam}")
        model.save_pretrained(folder)
        out[fam] = (folder, model)
    return out


# ------------------------------------------------------------------ tiny training runs (shared helpers)

TINY = ("{vocab_size: 64, hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 1, "
        "head_dim: 16, max_position_embeddings: 64}")


def tiny_overrides(out, **extra):
    """Dotted overrides of a 3-step run of a tiny fresh student against its own frozen snapshot."""
    base = {"train.out_dir": str(out), "train.steps": 3, "train.eval_every": 3, "train.eval_per_domain": 4,
            "train.checkpoint_every": 3, "train.progress": "false", "student.init": TINY,
            "teachers": "[{name: snap, path: self}]", "routing": "{addition: snap, reverse: snap, sort: snap}",
            "data.per_domain": 2, "data.group_size": 2, "data.max_new_tokens": 6}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_model(seed=0, *, scale=1.0, folder=None, family=None, **shape):
    """The tests' one builder of a tiny random opd_jax model: TINY's shape with `shape` overrides (family:
    that family's defaults under them, e.g. qwen3's q/k norm), init seed `seed`, every matrix multiplied by
    `scale` (> 1: sharper next-token distributions that differ from position to position). -> the model,
    or the Hugging Face folder it is saved to when `folder` is given."""
    import yaml
    from flax import nnx

    from opd_jax.models import ModelConfig, init_model, save_model

    kw = {**yaml.safe_load(TINY), **shape}
    model = init_model(ModelConfig.for_family(family, **kw) if family else ModelConfig(**kw), seed=seed)
    if scale != 1.0:
        for _, p in nnx.iter_graph(model):
            if isinstance(p, nnx.Param) and p[...].ndim > 1:
                p[...] = p[...] * scale
    return model if folder is None else save_model(model, folder)


def random_teacher(folder) -> dict:
    """Overrides routing every domain to a tiny random teacher saved under `folder` (unlike `self`,
    it disagrees with the student, so the loss and its gradient are far from 0)."""
    teacher = tiny_model(11, folder=folder / "teacher")
    return {"teachers": f"[{{name: t, path: {teacher}}}]", "routing": "{addition: t, reverse: t, sort: t}"}


def char_tokenizer_dir(folder):
    """The built-in character tokenizer saved under `folder` (for model folders saved without one)."""
    from opd_jax.tasks import build_char_tokenizer

    build_char_tokenizer(folder)
    return folder


def run_steps(run, n: int, state=None):
    """n steps of a built run through the library's own loop, with no run folder -> (state, the last
    log record). The first step donates `run.init`'s buffers."""
    from opd_jax.hooks import Logger, SkipCounter
    from opd_jax.train import train_loop

    logger = Logger(run)
    state = train_loop(run, run.init if state is None else state, [SkipCounter(run.cfg.train.max_skipped), logger],
                       start=0, end=n)
    return state, logger.last


def one_sgd_step(cfg):
    """Build `cfg`'s run and train its first step -> (run, the parameters' change, the step's log record, the
    step's batch as it trained). With optim sgd and lr 1 the change is minus the gradient."""
    import jax

    from opd_jax.run import build_run

    run = build_run(cfg)
    before, batch = host(run.init.params), run.rollouts.collect(0, run.init)
    state, rec = run_steps(run, 1)
    return run, jax.tree.map(lambda a, b: a - b, host(state.params), before), rec, batch


def assert_same_step(padded, packed):
    """Two one-step runs, (log record, parameter change, batch) each, took the same step: losses, divergence,
    token counts and teacher figures to 1e-5, the SGD change to 1e-4; the second one's parts are packed."""
    import jax
    import numpy as np
    import pytest

    (rec0, pad, b0), (rec1, step, b1) = padded, packed
    keys = [k for k in rec0 if k.startswith(("loss", "on_policy/divergence", "on_policy/tokens", "teacher/"))]
    for k in keys + ["rollout/eos_rate", "rollout/horizon"]:
        assert rec1[k] == pytest.approx(rec0[k], rel=1e-5, abs=1e-6), k  # a baselined loss is ~0 +- rounding
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(pad))
    assert scale > 1e-4  # the step moved the parameters
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), step, pad)
    assert all(p.packed for p in b1.arrays.values()) and not any(p.packed for p in b0.arrays.values())


def host(tree):
    import jax
    import numpy as np

    return jax.tree.map(lambda x: np.asarray(x).copy(), tree)


def rigged_model(table: dict[int, int], vocab=64, margin=10.0):
    """A one-layer model whose greedy next token is table[current token] (a bigram lookup): attention and
    MLP outputs are zeroed, the embedding is the identity, and the head puts `margin` on the table's entry."""
    import jax.numpy as jnp
    import numpy as np

    from opd_jax.models import ModelConfig, init_model

    cfg = ModelConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_position_embeddings=128)
    model = init_model(cfg, seed=0)
    model.layers.wo[...] = jnp.zeros_like(model.layers.wo[...])
    model.layers.w_down[...] = jnp.zeros_like(model.layers.w_down[...])
    model.embed[...] = jnp.eye(vocab)
    head = np.zeros((vocab, vocab), np.float32)
    for src, dst in table.items():
        head[src, dst] = margin
    model.lm_head[...] = jnp.asarray(head)
    return model


def run_readme_block(heading: str, config: str, folder, doc: str = "README.md"):
    """Run the first bash block under `heading` of `doc` (README.md or a file in docs/) as written, in
    `folder` holding configs/`config` (a name, or several), with one CPU device as a user's shell has -> the finished
    subprocess (its return code checked)."""
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / doc).read_text()
    block = re.search(r"```bash\n(.*?)```", readme[readme.index(heading):], re.S).group(1)
    (folder / "configs").mkdir()
    for name in [config] if isinstance(config, str) else config:
        shutil.copy(root / "configs" / name, folder / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ["OPD_TEST_XLA_FLAGS"]}
    res = subprocess.run(["bash", "-e", "-c", block], cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


# the longest modules first: with --dist loadscope a module runs on one worker, and a long one started
# last leaves the other worker idle at the end
SLOW_FIRST = ["test_real_model_readme.py", "test_plan.py", "test_xtok_train.py", "test_preemption.py",
              "test_tpu_recipes.py", "test_real_model.py", "test_train.py", "test_train_modes.py", "test_guard.py",
              "test_attention.py", "test_multihost.py", "test_prompts_verifiers.py", "test_async.py", "test_serving.py",
              "test_sharded_step.py", "test_opsd.py", "test_horizon.py", "test_roles.py", "test_run_safety.py",
              "test_engine.py", "test_serving_faults.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
