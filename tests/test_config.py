"""The config tree: YAML, dotted overrides, unknown keys with suggestions."""

import pytest

from opd_jax import OpdError
from opd_jax.config import load_config


def test_config_yaml_overrides_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 0.01\n  name: sgd\ndata:\n  domains: [addition, sort]\nrouting: {addition: t}\n"
                 "teachers:\n  - {name: t, path: self}\n")
    cfg = load_config(y, ["optim.lr=3e-4", "train.steps=7", "train.progress=false"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.name == "sgd" and cfg.train.steps == 7 and cfg.train.progress is False
    assert cfg.data.domains == ("addition", "sort") and cfg.teachers[0].path == "self"
    with pytest.raises(OpdError, match=r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"):
        load_config(y, ["optim.lrr=1"])
    with pytest.raises(OpdError, match="did you mean 'train'"):
        load_config(None, ["trian.steps=1"])
    with pytest.raises(OpdError, match="train.steps: expected int"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(OpdError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(OpdError, match=r"teachers\[0\].pth"):
        load_config(None, ["teachers=[{name: a, pth: b}]"])
