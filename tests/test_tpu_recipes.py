"""The TPU recipes plan to fit their slices, and the TPU scripts issue the gcloud commands they should
(checked with a stand-in `gcloud` that records its arguments)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from opd_jax.config import load_config
from opd_jax.models import ModelConfig
from opd_jax.plan import GiB, plan

ROOT = Path(__file__).parent.parent
QWEN3 = {  # shapes of the released checkpoints (config.json)
    "Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8,
                       tie_word_embeddings=True),
    "Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8,
                     tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8,
               tie_word_embeddings=False),
}
V5P_HBM_GIB = 95


def _config_only_models(text: str, root: Path) -> str:
    """Point every /mnt/shared/models/X at a folder holding only X's config.json (no weights)."""
    for name in set(re.findall(r"/mnt/shared/models/([\w.\-]+)", text)):
        shape = QWEN3[name] if name in QWEN3 else QWEN3["8b"]
        cfg = ModelConfig.for_family("qwen3", vocab_size=151936, head_dim=128, max_position_embeddings=40960,
                                     rope_theta=1e6, param_dtype="bfloat16", dtype="bfloat16", **shape)
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(cfg.to_hf()))
    return text.replace("/mnt/shared/models/", f"{root}/")


@pytest.mark.parametrize("recipe, devices, student_params, teacher_count", [
    ("qwen3_1p7b_from_8b.yaml", 16, 1_720_574_976, 1),
    ("mopd_4_teachers.yaml", 32, 4_022_468_096, 4),
])
def test_recipes_fit_their_slices(tmp_path, recipe, devices, student_params, teacher_count):
    text = _config_only_models((ROOT / "configs" / "recipes" / recipe).read_text(), tmp_path / "models")
    (tmp_path / "r.yaml").write_text(text)
    p = plan(load_config(tmp_path / "r.yaml"), n_devices=devices)
    assert p["student_params"] == student_params  # Qwen3's published totals (embeddings tied)
    assert len(p["teachers"]) == teacher_count
    assert all(t["params"] == 8_190_735_360 for t in p["teachers"].values())
    assert p["total_bytes_per_device"] < 0.5 * V5P_HBM_GIB * GiB  # half of HBM left for activations
    # sharding really divides the run: one chip would hold far more than one device of the slice
    one = plan(load_config(tmp_path / "r.yaml", ["mesh.fsdp=1"]), n_devices=1)
    assert p["total_bytes_per_device"] < one["total_bytes_per_device"] / (devices / 2)


def test_tpu_scripts_issue_the_expected_gcloud_commands(tmp_path):
    log = tmp_path / "gcloud.log"
    fake = tmp_path / "gcloud"
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "GCLOUD": str(fake), "ZONE": "us-east5-a", "TPU_NAME": "t1", "PROJECT": "p1"}
    run = lambda *a, **kw: subprocess.run(["bash", *a], cwd=ROOT, env={**env, **kw}, check=True,  # noqa: E731
                                          capture_output=True, text=True)
    run("scripts/tpu/create.sh", QUEUED="1", SPOT="1", ACCELERATOR="v5p-64")
    run("scripts/tpu/install.sh")
    run("scripts/tpu/launch.sh", "configs/recipes/mopd_4_teachers.yaml", "train.steps=10", RESUME="1")
    run("scripts/tpu/delete.sh")
    calls = log.read_text().splitlines()
    assert calls[0].startswith("compute tpus queued-resources create t1 --node-id t1 --zone us-east5-a --project p1")
    assert "--accelerator-type v5p-64" in calls[0] and "--spot" in calls[0]
    assert calls[1].startswith("compute tpus tpu-vm scp") and "--worker=all" in calls[1]
    assert "pip install -q -e '.[tpu]'" in calls[2] and "--worker=all" in calls[2]
    assert "opd-jax train --config configs/recipes/mopd_4_teachers.yaml --resume train.steps=10" in calls[3]
    assert "--worker=all" in calls[3]
    assert calls[4].startswith("compute tpus tpu-vm delete t1")
    missing = subprocess.run(["bash", "scripts/tpu/create.sh"], cwd=ROOT, capture_output=True, text=True,
                             env={k: v for k, v in env.items() if k != "ZONE"})
    assert missing.returncode != 0 and "set ZONE" in missing.stderr
