"""`opd-jax demo`'s pieces that a test can afford (the whole demo takes about 3 minutes; its figures
are in the README, measured with the command there): the teacher cache key and folder, and the OPD
stage's config."""

from opd_jax import demo
from opd_jax.config import validate
from opd_jax.layout import RowLayout


def test_the_teacher_cache_key_follows_the_recipe_and_the_cache_folder_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_JAX_CACHE", str(tmp_path))
    assert demo.cache_root() == tmp_path
    keys = {d: demo.teacher_key(d) for d in demo.DOMAINS}
    assert len(set(keys.values())) == 3  # one teacher per domain
    monkeypatch.setattr(demo, "TEACHER_SFT", {**demo.TEACHER_SFT, "addition": demo.TEACHER_SFT["addition"] + 1})
    assert demo.teacher_key("addition") != keys["addition"] and demo.teacher_key("sort") == keys["sort"]


def test_the_opd_stage_is_a_valid_multi_teacher_config(tmp_path):
    prep = {"student": tmp_path / "student_init", "out": tmp_path,
            "teachers": {d: tmp_path / "teachers" / d for d in demo.DOMAINS}}
    cfg = validate(demo.opd_config(prep, tmp_path / "opd", steps=10))
    rows = RowLayout.from_config(cfg)
    assert rows.routes == demo.DOMAINS and rows.teachers() == tuple(sorted(demo.DOMAINS))  # each domain its own
    assert cfg.train.checkpoint_every == 5 and cfg.train.eval_every == 2  # the last step is saved and evaluated
    assert cfg.data.tokenizer == str(tmp_path / "tokenizer")  # the student folder carries none: named here


def test_the_teacher_cache_key_follows_the_code_that_trains_it(tmp_path, monkeypatch):
    """A changed training file (or model code) gives another key, so a stale cached teacher is not reused
    (a fresh cache once gave an addition teacher of 0.53 where an old cache hid it at 0.98)."""
    import shutil
    from pathlib import Path

    pkg = Path(demo.__file__).resolve().parent
    for name in demo.TEACHER_CODE:  # a copy of the training code to edit
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (pkg / name).is_dir() else shutil.copy)(pkg / name, tmp_path / name)
    assert demo.code_version(tmp_path) == demo.code_version()
    key = demo.teacher_key("addition")
    for edited in ("sft.py", "models/attention.py"):
        f = tmp_path / edited
        original = f.read_text()
        f.write_text(original + "\n# changed\n")
        changed = demo.code_version(tmp_path)
        f.write_text(original)
        assert changed != demo.code_version()
        monkeypatch.setattr(demo, "code_version", lambda root=None, v=changed: v)
        assert demo.teacher_key("addition") != key
        monkeypatch.undo()
    monkeypatch.setattr(demo, "TEACHER_WARMUP", demo.TEACHER_WARMUP + 1)
    assert demo.teacher_key("addition") != key
