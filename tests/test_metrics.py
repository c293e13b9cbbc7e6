"""metrics.jsonl / samples.jsonl: one record per step across resumes, torn lines repaired, plots written."""

import json
import warnings

import pytest

from opd_jax import OpdError
from opd_jax.metrics import MetricsWriter, SamplesWriter, plot_metrics, read_metrics
from opd_jax.run_folder import repair_jsonl


def test_resume_keeps_records_up_to_the_checkpoint_and_plots(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in (1, 2, 3):
        w.write(s, {"loss": 1.0 / s, "on_policy/divergence": 0.5 / s, "eval/a/accuracy": 0.1 * s})
    w.close()
    w = MetricsWriter(tmp_path, resume_step=2, tensorboard=False)  # resumed from step 2's checkpoint
    w.write(3, {"loss": 0.25})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    names = {p.name for p in plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots")}
    assert names == {"loss.png", "divergence.png", "accuracy.png"}


def test_a_cut_off_last_line_is_dropped_and_a_corrupt_middle_line_is_named(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"step": 1, "completion": "a"}\n{"step": 2, "comp')
    with pytest.warns(UserWarning, match="dropped a cut-off last line"):
        SamplesWriter(tmp_path, resume_step=2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(OpdError, match="line 2 is not valid JSON"):
        repair_jsonl(path)
    path.write_text('{"step": 1}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert repair_jsonl(path) == 0  # an intact file is left alone, silently
