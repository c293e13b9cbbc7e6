"""README's "A real model" block, run as written: get SmolLM2-135M-Instruct (scripts/get_smollm2.sh,
cached per machine), cut it to 24 layers with the recorded choice, and distil the full model into the
cut one for 10 steps with an evaluation at the end."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_readme_real_model_block_runs_as_written(tmp_path, monkeypatch):
    from conftest import run_readme_block

    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "get_smollm2.sh", tmp_path / "scripts")
    res = run_readme_block("## A real model", "smollm2_prune_recover.yaml", tmp_path)
    student = tmp_path / "runs" / "smollm2-24"
    pruning = json.loads((student / "pruning.json").read_text())
    assert sorted(pruning["dropped"]) == [5, 12, 14, 17, 18, 25] and len(pruning["kept"]) == 24
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 24
    recs = [json.loads(x) for x in (tmp_path / "runs" / "smollm2_opd" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    final = [r for r in recs if "eval/mean/accuracy" in r]
    assert final and final[-1]["step"] == 10 and 0.0 <= final[-1]["eval/mean/accuracy"] <= 1.0
    assert "eval" in res.stdout + res.stderr
    # the run trained the cut model: its final parameters differ from the folder it started from
    import jax
    from flax import nnx

    from opd_jax.export import restore_run_params
    from opd_jax.models import load_model

    monkeypatch.chdir(tmp_path)  # the run's config names its student as the README wrote it, relative
    _, params, _ = restore_run_params(tmp_path / "runs" / "smollm2_opd")
    start = nnx.to_pure_dict(nnx.split(load_model(student))[1])
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()),
                         params, start)
    assert max(jax.tree.leaves(moved)) > 0
