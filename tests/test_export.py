"""`opd_jax.export`: a run folder's checkpoint out as a Hugging Face folder, checked against
transformers' torch forward of the parameters the test itself saved, and the export target refusals."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from opd_jax import checkpoint as ckpt
from opd_jax.config import load_config, to_dict
from opd_jax.errors import OpdError
from opd_jax.export import check_export_target, export_student, restore_run_params
from opd_jax.optim import make_optimizer
from opd_jax.run import build_student
from opd_jax.run_folder import write_config
from opd_jax.train_step import new_state

from conftest import char_tokenizer_dir, tiny_overrides


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder written by hand: its config, the tokenizer, and checkpoints 1 and 2 whose parameters
    are the initial ones times 1.5 and 2.5 (so each step's export is known without training)."""
    run = tmp_path_factory.mktemp("export") / "run"
    cfg = load_config(None, tiny_overrides(run))
    run.mkdir()
    write_config(run, to_dict(cfg))
    char_tokenizer_dir(run / "tokenizer")
    graphdef, state = nnx.split(build_student(cfg.student, cfg.train.seed))
    base = nnx.to_pure_dict(state)
    opt = make_optimizer(cfg.optim, cfg.train.steps, base)
    mgr = ckpt.manager(run / "checkpoints")
    saved = {}
    for step, scale in ((1, 1.5), (2, 2.5)):
        params = jax.tree.map(lambda x: np.asarray(x) * scale, base)
        st = new_state(params, opt.init(params), jax.random.key(0))._replace(step=np.asarray(step, np.int32))
        ckpt.save(mgr, step, st)
        saved[step] = params
    return run, graphdef, saved


def _torch_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_export_writes_the_chosen_checkpoint_that_transformers_reads(run_folder, tmp_path):
    run, graphdef, saved = run_folder
    ids = np.array([[1, 20, 21, 22, 5, 30]])
    for step, out in ((None, tmp_path / "newest"), (1, tmp_path / "first")):
        folder = export_student(run, out, step=step)
        want = saved[step or 2]
        ours = np.asarray(nnx.merge(graphdef, want)(ids))  # the saved parameters, not the export's reader
        np.testing.assert_allclose(_torch_logits(folder, ids), ours, atol=1e-4)
        assert json.loads((folder / "opd_jax_step.json").read_text()) == {"step": step or 2}
        assert (folder / "tokenizer.json").exists()  # the run's tokenizer travels with the student
    _, params, step = restore_run_params(run, 1)
    assert step == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, saved[1])


def test_export_targets_are_refused_in_one_line(run_folder, tmp_path):
    run, _, _ = run_folder
    cfg = load_config(run / "config.yaml")
    for target in (run, run / "checkpoints" / "1"):  # even with force
        with pytest.raises(OpdError, match="one of the run's own folders"):
            check_export_target(target, run, cfg, force=True)
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    with pytest.raises(OpdError, match="is a file"):
        check_export_target(afile, run, cfg, force=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(OpdError, match="already holds files; pass --force"):
        check_export_target(full, run, cfg, force=False)
    check_export_target(full, run, cfg, force=True)  # allowed with force
    assert (full / "keep.txt").read_text() == "mine"  # a refusal or a check writes nothing
    with pytest.raises(OpdError, match="does not exist"):
        export_student(tmp_path / "no_run", tmp_path / "out")
    with pytest.raises(OpdError, match="not a run folder"):
        export_student(full, tmp_path / "out")
