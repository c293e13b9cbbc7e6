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
