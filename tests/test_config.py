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


def _config_doc():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "config_doc.py"
    spec = importlib.util.spec_from_file_location("config_doc", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_config_md_is_current_and_every_key_is_described():
    """docs/config.md is what scripts/config_doc.py prints now, and every key of every section has a
    line of description; the comment reader is checked on a made-up class first."""
    import dataclasses
    from pathlib import Path

    from opd_jax import config as C

    doc = _config_doc()
    made_up = "class A:\n    # above, line 1\n    # line 2\n    x: int = 1  # beside\n    y: int = 2\n    z: str = 'a#b'\n"
    assert doc.field_comments(made_up)["A"] == {"x": "above, line 1 line 2 beside", "y": "", "z": ""}
    text = doc.render()
    assert (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text() == text, \
        "docs/config.md is stale: run python scripts/config_doc.py > docs/config.md"
    notes = doc.field_comments(Path(C.__file__).read_text())
    for section, cls in C._SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert notes[cls.__name__][f.name], f"config {section}.{f.name} has no comment"
            assert f"`{section}.{f.name}`" in text
    for f in dataclasses.fields(C.TeacherSpec):
        assert notes["TeacherSpec"][f.name], f"config teachers[].{f.name} has no comment"


def test_the_readme_config_is_the_demo_config(tmp_path):
    """README's yaml block under "Training from a config" says it is configs/demo.yaml: both load to
    the same config."""
    import re
    from pathlib import Path

    from opd_jax.config import load_config

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", readme[readme.index("## Training from a config"):], re.S).group(1)
    (tmp_path / "readme.yaml").write_text(block)
    assert load_config(str(tmp_path / "readme.yaml")) == load_config(str(root / "configs" / "demo.yaml"))
