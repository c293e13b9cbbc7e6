"""The stop-rate guard: rollout/eos_rate and mean length against a hand count, and a student rigged
never to stop is warned about once and then stopped in one line, its checkpoints intact."""

import numpy as np
import pytest

from opd_jax.config import load_config
from opd_jax.errors import OpdError
from opd_jax.hooks import stop_metrics
from opd_jax.models import save_model
from opd_jax.train import train

from conftest import char_tokenizer_dir, rigged_model, tiny_overrides


def test_eos_rate_and_length_match_a_hand_count():
    # 4 rows, P = 2, N = 4, stop ids {2, 5}: ends with 2 / runs to the cap / ends with 5 at the cap / empty
    tokens = np.array([[9, 9, 7, 2, 0, 0], [9, 9, 7, 8, 8, 8], [9, 9, 7, 7, 7, 5], [9, 9, 0, 0, 0, 0]])
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    m = stop_metrics(tokens, mask, (2, 5))
    assert m["rollout/eos_rate"] == 2 / 4 and m["rollout/mean_length"] == (2 + 4 + 4 + 0) / 4


def test_a_student_that_never_stops_is_warned_then_stopped(tmp_path, capsys):
    """Every token's greedy successor is 10 (never a stop id) with a margin that sampling at
    temperature 1 keeps (e^10 to 1): eos_rate is 0 at every log step; the run warns once at step 1
    and stops at step 2 (eos_patience 2) with one line; the step-1 checkpoint is there."""
    folder = save_model(rigged_model({t: 10 for t in range(64)}, margin=30.0), tmp_path / "never_stops")
    char_tokenizer_dir(folder)
    over = tiny_overrides(tmp_path / "r", **{"student.path": str(folder), "student.init": "{}",
                                            "loss.estimator_type": "sampled", "train.min_eos_rate": 0.5,
                                            "train.eos_patience": 2, "train.steps": 5, "train.checkpoint_every": 1,
                                            "train.eval_every": 100})
    with pytest.raises(OpdError) as e:
        train(load_config(None, over))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("at step 2 rollout/eos_rate 0.00 has been below train.min_eos_rate 0.5 "
                                              "for 2 log steps (mean completion length 6.0)")
    out = capsys.readouterr().out
    assert out.count("warning: at step 1 only 0.00 of completions end with a stop id") == 1
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
