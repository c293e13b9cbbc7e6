"""`opd_jax.checks.check`: every feature's configuration check, run once before anything is read or written."""

import pytest

from opd_jax import OpdError
from opd_jax.config import load_config


@pytest.mark.parametrize("extra, message", [
    ({"teachers": "[{name: snap, path: self_live}]", "train.max_staleness": 1}, "self_live .* train.max_staleness"),
    ({"optim.effopd_guard": "true", "optim.effopd_window": 2, "train.max_staleness": 1}, "needs synchronous"),
    ({"mesh.roles": "{critic: 0-3}"}, "mesh.roles names 'critic', which is not a role"),
    ({"data.horizon_schedule": "sometimes"}, "horizon_schedule must be one of"),
    ({"teachers": "[{name: snap, path: self, privileged: answer, privileged_template: 'no prompt'}]"},
     "privileged_template must contain"),
    ({"teachers": "[{name: snap, url: 'http://127.0.0.1:9'}]", "loss.estimator_type": "full"}, "served .* not hidden"),
])
def test_one_check_refuses_before_the_run_folder_is_touched(tmp_path, monkeypatch, extra, message):
    """`checks.check` refuses a combination no run can honour, in one line, before train() looks at the run
    folder (its first step, check_writable, must not be reached) or reads a model."""
    from conftest import tiny_overrides

    import opd_jax.train as train_mod

    def touched(*a, **k):
        raise AssertionError("the run folder was checked before the configuration")

    monkeypatch.setattr(train_mod, "check_writable", touched)
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **extra))
    with pytest.raises(OpdError, match=message):
        train_mod.train(cfg)
    assert not (tmp_path / "run").exists()
