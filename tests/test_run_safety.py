"""The run folder never loses or mixes data, and bad input is a one-line OpdError with nothing written.

One test per way a careless user (or a crash) could damage a run: two writers, deleting every
checkpoint, a torn log line, a damaged checkpoint, an export over a model folder, a guessed
tokenizer, an absurd update, invalid numbers and misleading messages; plus what a resume may change.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from opd_jax import OpdError
from opd_jax.cli import main
from opd_jax.config import load_config
from opd_jax.train import export_student, restore_run_params, train

from conftest import char_tokenizer_dir, random_teacher, tiny_model, tiny_overrides


def one_line_error(argv, capsys) -> str:
    """Run the CLI, expect exit 2 with exactly one stderr line; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opd-jax: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-step run with a checkpoint at each step and a random teacher (every step moves the weights)."""
    root = tmp_path_factory.mktemp("finished")
    over = {"train.steps": 2, "train.checkpoint_every": 1, "train.keep_checkpoints": 3, "train.eval_every": 2,
            **random_teacher(root)}
    train(load_config(None, tiny_overrides(root / "run", **over)))
    return root / "run", over


# ------------------------------------------------------------------------------------------ config numbers

@pytest.mark.parametrize("key,value,message", [
    ("train.keep_checkpoints", 0, "train.keep_checkpoints must be >= 1 .*delete every checkpoint"),
    ("data.group_size", 0, "data.group_size must be >= 1"),
    ("data.per_domain", 0, "data.per_domain must be >= 1"),
    ("train.checkpoint_every", 0, "train.checkpoint_every must be >= 1"),
    ("train.eval_every", 0, "train.eval_every must be >= 1"),
    ("train.log_every", -2, "train.log_every must be >= 1"),
    ("train.steps", 0, "train.steps must be >= 1"),
    ("optim.lr", -1, "optim.lr must be > 0"),
    ("data.top_p", 1.5, r"data.top_p must be in \(0, 1\]"),
    ("data.top_p", 0, r"data.top_p must be in \(0, 1\]"),
    ("data.temperature", -0.5, "data.temperature must be > 0"),
    ("data.top_k", -1, "data.top_k must be >= 0"),
    ("train.max_update_ratio", 0.5, "train.max_update_ratio must be > 1, or 0"),
])
def test_invalid_numbers_are_refused_before_anything_is_read_or_written(tmp_path, capsys, key, value, message):
    with pytest.raises(OpdError, match=message):
        load_config(None, tiny_overrides(tmp_path / "r", **{key: value}))
    err = one_line_error(["train", *tiny_overrides(tmp_path / "r", **{key: value})], capsys)
    assert key in err
    assert not (tmp_path / "r").exists()


def test_cli_integer_flags_and_plan_without_a_config(tmp_path, capsys, finished):
    run, _ = finished
    assert "--per-domain must be >= 1" in one_line_error(["eval", "--model", str(run), "--per-domain", "0"], capsys)
    assert "--samples must be >= 1" in one_line_error(["eval", "--model", str(run), "--samples", "-3"], capsys)
    assert "--devices must be >= 1" in one_line_error(["plan", "--config", "configs/tiny_self.yaml", "--devices", "0"],
                                                      capsys)
    assert "plan needs --config" in one_line_error(["plan"], capsys)


# ------------------------------------------------------------------------------------------ one writer

def _long_run(out):
    """A real process that holds the run folder: `opd-jax train` of a long run, started in the background."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ["OPD_TEST_XLA_FLAGS"] + " --xla_force_host_platform_device_count=1"}
    args = tiny_overrides(out, **{"train.steps": 10000, "train.eval_every": 10000, "train.checkpoint_every": 10000})
    return subprocess.Popen([sys.executable, "-m", "opd_jax.cli", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True), args, env


def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "shared"
    first, args, env = _long_run(out)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists():  # the first run is training
            assert first.poll() is None and time.time() < deadline, "the first run ended early"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "opd_jax.cli", "train", *args], env=env, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"in use by another run (process {first.pid} on {socket.gethostname()}" in err[0]
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] == first.pid  # the refused run left the lock alone
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the holder is gone (SIGKILL left its lock behind): the next run takes the stale lock over, with a warning
    with pytest.warns(UserWarning, match=f"taking over a stale lock \\(process {first.pid}"):
        train(load_config(None, tiny_overrides(out, **{"train.steps": 1, "train.eval_every": 1})))
    assert not (out / ".lock").exists()  # released at the end


# ------------------------------------------------------------------------------------------ resume

def test_resume_repairs_a_torn_log_and_continues_bit_exactly_with_more_steps(tmp_path, finished):
    """A crash mid-write leaves half a line in metrics.jsonl and samples.jsonl: resume drops it with a
    warning. Raising only train.steps on resume continues exactly as a run that had those steps."""
    import shutil

    run, over = finished
    torn = tmp_path / "torn"
    shutil.copytree(run, torn)
    cfg_text = (torn / "config.yaml").read_text()
    for name in ("metrics.jsonl", "samples.jsonl"):
        with (torn / name).open("a") as f:
            f.write('{"step": 3, "loss": 0.1')  # cut off
    more = {**over, "train.steps": 3, "train.checkpoint_every": 3}
    with pytest.warns(UserWarning, match="dropped a cut-off last line"):
        train(load_config(None, tiny_overrides(torn, **more)), resume=True)
    assert [json.loads(x)["step"] for x in (torn / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (torn / "config.yaml").read_text() == cfg_text  # resume keeps the config the run started with
    straight = tmp_path / "straight"
    train(load_config(None, tiny_overrides(straight, **more)))
    a, b = restore_run_params(torn)[1], restore_run_params(straight)[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_with_a_changed_config_is_refused_naming_the_keys(finished, capsys):
    run, over = finished
    err = one_line_error(["train", "--resume", *tiny_overrides(run, **over, **{"train.seed": 7, "optim.lr": 0.5})],
                         capsys)
    assert "cannot resume" in err and "train.seed (0 -> 7)" in err and "optim.lr" in err
    assert "below the 2 steps" in one_line_error(["train", "--resume", *tiny_overrides(run, **{
        **over, "train.steps": 1})], capsys)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, finished, capsys):
    import shutil

    run, over = finished
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    for f in (broken / "checkpoints" / "2").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncated array data
    with pytest.raises(OpdError) as e:
        restore_run_params(broken, 2)
    assert "checkpoint step 2" in str(e.value) and "<bound method" not in str(e.value)
    more = {**over, "train.steps": 3}
    with pytest.warns(UserWarning, match="checkpoint step 2 .* cannot be restored .*resuming from step 1 instead"):
        train(load_config(None, tiny_overrides(broken, **more)), resume=True)
    steps = sorted(p.name for p in (broken / "checkpoints").iterdir())
    assert "damaged_step_2" in steps and "3" in steps  # the damaged one is kept aside, nothing deleted
    assert [json.loads(x)["step"] for x in (broken / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # --resume-step picks a checkpoint; a step that does not exist is a whole sentence
    err = one_line_error(["train", "--resume-step", "9", *tiny_overrides(broken, **more)], capsys)
    assert "there is no checkpoint for step 9" in err


# ------------------------------------------------------------------------------------------ export

def test_export_never_overwrites_a_model_folder(tmp_path, finished, capsys):
    run, _ = finished
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "model.safetensors").write_text("keep me")
    assert "already holds files; pass --force" in one_line_error(["export", "--run", str(run), "--out", str(existing)],
                                                                capsys)
    assert (existing / "model.safetensors").read_text() == "keep me"
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert "is a file" in one_line_error(["export", "--run", str(run), "--out", str(afile)], capsys)
    teacher = json.loads(json.dumps(load_config(run / "config.yaml").teachers[0].path))
    assert "one of the run's own folders" in one_line_error(
        ["export", "--run", str(run), "--out", teacher, "--force"], capsys)
    assert "one of the run's own folders" in one_line_error(
        ["export", "--run", str(run), "--out", str(run / "checkpoints"), "--force"], capsys)
    assert main(["export", "--run", str(run), "--out", str(existing), "--force"]) == 0
    assert (existing / "config.json").exists()
    export_student(run, tmp_path / "fresh")  # a new folder needs no --force


# ------------------------------------------------------------------------------------------ inputs

def test_a_student_folder_without_a_tokenizer_is_refused_unless_data_tokenizer_names_one(tmp_path):
    from opd_jax.run import get_tokenizer

    folder = tiny_model(0, folder=tmp_path / "student")
    cfg = load_config(None, tiny_overrides(tmp_path / "r", **{"student.path": str(folder), "student.init": "{}"}))
    with pytest.raises(OpdError, match="has no tokenizer .*set data.tokenizer"):
        train(cfg)
    assert not (tmp_path / "r").exists()
    named = load_config(None, tiny_overrides(tmp_path / "r", **{
        "student.path": str(folder), "student.init": "{}", "data.tokenizer": str(char_tokenizer_dir(tmp_path / "tok"))}))
    assert get_tokenizer(named).name_or_path == str(tmp_path / "tok")


def test_bad_paths_get_messages_that_name_the_real_problem(tmp_path, finished, capsys):
    run, _ = finished
    afile = tmp_path / "weights.bin"
    afile.write_text("x")
    with pytest.raises(OpdError, match="student.path .* is a file; it must be a Hugging Face model folder"):
        train(load_config(None, tiny_overrides(tmp_path / "r", **{"student.path": str(afile)})))
    assert "--model " + str(tmp_path / "nope") + " does not exist" in one_line_error(
        ["eval", "--model", str(tmp_path / "nope")], capsys)
    assert "is a run folder" in one_line_error(["eval", "--model", str(run)], capsys) and "opd-jax export" in \
        one_line_error(["eval", "--model", str(run)], capsys)
    clash = random_teacher(tmp_path / "t")  # a teacher folder, tmp_path/t/teacher, as the run's own out_dir
    with pytest.raises(OpdError, match="is one of the run's inputs"):
        train(load_config(None, tiny_overrides(tmp_path / "t" / "teacher", **clash)))
    assert sorted(p.name for p in (tmp_path / "t" / "teacher").iterdir()) == ["config.json", "model.safetensors"]
    # an out_dir whose parent is a file, or that cannot be written: refused before anything is written
    with pytest.raises(OpdError, match="cannot be created: .* is a file"):
        train(load_config(None, tiny_overrides(afile / "run")))
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # (root can write anywhere)
            with pytest.raises(OpdError, match="cannot be written"):
                train(load_config(None, tiny_overrides(locked / "run")))
    finally:
        locked.chmod(0o700)
    # a text file named .parquet: its error is printed once, on one line
    fake = tmp_path / "prompts.parquet"
    fake.write_text("not parquet")
    err = one_line_error(["train", *tiny_overrides(tmp_path / "p", **{"data.path": str(fake)})], capsys)
    assert "could not be read" in err and not (tmp_path / "p").exists()
    assert capsys.readouterr().out == ""


def test_analyze_refuses_models_of_different_shapes_and_writes_nothing(tmp_path, finished, capsys):
    run, _ = finished
    wide = tiny_model(0, folder=tmp_path / "wide", hidden_size=48)
    out = tmp_path / "an"
    err = one_line_error(["analyze", "--before", str(run), "--after", str(wide), "--out", str(out)], capsys)
    assert "different models" in err and not out.exists()


# ------------------------------------------------------------------------------------------ absurd updates

def test_an_absurd_update_is_skipped_and_never_reaches_a_checkpoint(tmp_path):
    """optim.lr=1e30 (AdamW): the gradients are finite but the update is not, so it is skipped on device
    like a non-finite gradient (even with the norm-ratio check off); the run stops after
    train.max_skipped of them and the checkpoint holds the step-0 weights (before, the first update was
    applied and saved)."""
    from flax import nnx

    from opd_jax.run import build_student

    out = tmp_path / "r"
    cfg = load_config(None, tiny_overrides(out, **{"optim.lr": 1e30, "train.checkpoint_every": 1,
                                                  "train.max_skipped": 2, "train.max_update_ratio": 0,
                                                  **random_teacher(tmp_path)}))  # the norm-ratio check off
    with pytest.raises(OpdError, match=r"the gradient or the update is not finite at step 2 \(2 skipped"):
        train(cfg)
    p0 = nnx.to_pure_dict(nnx.state(build_student(cfg.student, cfg.train.seed)))
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1]
    for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(restore_run_params(out, 1)[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("ratio", [0.0, 2.0])
def test_an_update_that_multiplies_the_parameter_norm_is_skipped(ratio):
    """SGD with lr 1e4 on a tiny model: a finite update whose new global norm is many times the old
    one. With train.max_update_ratio=2 it is skipped (parameters kept, flagged); with 0 (off) it is
    applied. The reported ratio equals ||p1|| / ||p0|| computed here from the two parameter sets."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from opd_jax.config import LossConfig
    from opd_jax.train_step import StepSpec, TrainState, train_step

    model = tiny_model(0)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    rng = np.random.RandomState(0)
    B, P, N = 4, 4, 3
    from opd_jax.batch import Part

    batch = {"on": Part(jnp.asarray(rng.randint(3, 64, (B, P + N)), jnp.int32), jnp.ones((B, P), jnp.int32),
                        jnp.ones((B, N), jnp.int32), jnp.asarray(rng.normal(0, 3, (B, N, 64)), jnp.float32))}
    opt = optax.sgd(1e4)
    p0 = jax.tree.map(np.asarray, params)
    st = TrainState(params, opt.init(params), jnp.zeros((), jnp.int32), jax.random.key_data(jax.random.key(0)),
                    jnp.zeros((), jnp.int32))
    spec = StepSpec(LossConfig(estimator_type="full"), prompt_len=P, group_size=1, temperature=1.0,
                    max_update_ratio=ratio)
    new, m = train_step(graphdef, opt, spec, st, batch)
    p1 = jax.tree.map(np.asarray, new.params)
    norm = lambda t: np.sqrt(sum(float(np.sum(np.square(x.astype(np.float64)))) for x in jax.tree.leaves(t)))  # noqa: E731
    if ratio:
        assert float(m["skipped"]) == 1.0 and float(m["update_ratio"]) > 2.0
        for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
            np.testing.assert_array_equal(x, y)
    else:
        assert float(m["skipped"]) == 0.0
        assert float(m["update_ratio"]) == pytest.approx(norm(p1) / norm(p0), rel=1e-4) and norm(p1) > 2 * norm(p0)
    assert int(new.step) == 1 and int(new.data_position) == 1


def test_sigterm_during_setup_exits_with_one_line_and_leaves_nothing(tmp_path):
    """A preemption notice before the first step (while the run is being built): one line on stderr,
    exit 2, and the run folder it had just created is gone again."""
    out = tmp_path / "r"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ["OPD_TEST_XLA_FLAGS"] + " --xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen([sys.executable, "-m", "opd_jax.cli", "train", *tiny_overrides(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / ".lock").exists():  # the run holds its folder: setup has begun
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == ["opd-jax: error: stopped by SIGTERM during setup, before the first step; no "
                                        "checkpoint was written"]
    assert not out.exists()


def test_sigterm_whose_exception_is_swallowed_during_setup_still_stops_the_run(tmp_path, monkeypatch):
    """Python prints and ignores an exception raised in a gc callback (JAX has one), so the SIGTERM
    handler's exception can be lost; the run must still stop before the first step with the same one-line
    error and leave no folder. Here the handler runs inside setup and its exception is swallowed."""
    import types

    import opd_jax.train as tr

    def build_run(cfg, **kw):
        try:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        except BaseException:  # noqa: BLE001 - what a gc callback does with it
            pass
        return types.SimpleNamespace(init=None)

    monkeypatch.setattr(tr, "build_run", build_run)
    out = tmp_path / "r"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(OpdError, match="stopped by SIGTERM during setup"):
        train(load_config(None, tiny_overrides(out)))
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is before  # setup's handler is gone again
