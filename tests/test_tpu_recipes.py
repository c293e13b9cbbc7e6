"""The TPU recipes plan to fit their slices, and the TPU scripts issue the gcloud commands they should
(checked with a stand-in `gcloud` that records its arguments)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from opd_jax.config import load_config
from opd_jax.models.released import config_only_recipe
from opd_jax.plan import GiB, Plan, plan

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
PUBLISHED = {"Qwen3-1.7B": 1_720_574_976, "Qwen3-4B": 4_022_468_096,  # Qwen3's totals (embeddings tied)
             "Qwen3-8B": 8_190_735_360}

# the compiled plan of a recipe on as many fake CPU devices as its mesh names (tests run with 8)
PLAN = """
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("OPD_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=" + sys.argv[2]
from opd_jax.config import load_config
from opd_jax.plan import plan
print(json.dumps(plan(load_config(sys.argv[1]), n_devices=int(sys.argv[2]), compile=True).as_dict()))
"""


def _recipe(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / path.name
    out.write_text(config_only_recipe(path.read_text(), tmp_path / "models"))
    return out


def test_every_recipe_is_a_valid_config_that_names_its_chips(tmp_path):
    """Every recipe in configs/recipes (each one is then planned below) passes the config's validation
    and names its mesh sizes and chip memory, which the fit check needs."""
    assert {p.name for p in RECIPES} >= {"qwen3_1p7b_from_8b.yaml", "qwen3_1p7b_from_8b_full.yaml",
                                         "mopd_4_teachers.yaml"}
    for recipe in RECIPES:
        cfg = load_config(_recipe(recipe, tmp_path))
        assert cfg.mesh.device_memory_gb and min(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) >= 1, recipe.name
        assert cfg.teachers and set(cfg.routing.values()) <= {t.name for t in cfg.teachers}, recipe.name


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_fit_their_chips_with_activations(tmp_path, recipe):
    """Each recipe names its chips (mesh sizes, mesh.device_memory_gb). Planned on config-only model
    folders with the trainer's own compiled step (activations included), at its own shape, it needs
    at most 0.8 of one chip's memory; and sharding really divides it."""
    path = _recipe(recipe, tmp_path)
    cfg = load_config(path)
    mc = cfg.mesh
    assert mc.device_memory_gb, f"{recipe.name} must name its chip's memory (mesh.device_memory_gb)"
    assert -1 not in (mc.data, mc.fsdp, mc.tensor), f"{recipe.name} must name its chip count (mesh sizes)"
    devices = mc.data * mc.fsdp * mc.tensor  # the learner's
    chips = devices  # the slice: with roles on devices of their own, all of them are planned
    if mc.roles:
        chips = max(int(str(r).split("-")[-1]) for r in mc.roles.values()) + 1
    run = subprocess.run([sys.executable, "-c", PLAN, str(path), str(chips)], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
    p = Plan(**json.loads(run.stdout.strip().splitlines()[-1]))
    student = re.search(r"student: \{path: /mnt/shared/models/([\w.\-]+)", recipe.read_text()).group(1)
    adapters = p.trainable_params if p.trainable_params != p.student_params else 0  # LoRA: the adapters train
    assert p.student_params - adapters == PUBLISHED[student]
    if "lora:" in recipe.read_text():  # rank r on q, k, v, o, gate, up, down: r x (in + out) per layer, by hand
        r, d, q, kv, f, layers = 64, 4096, 32 * 128, 8 * 128, 12288, 36
        assert adapters == r * layers * ((d + q) * 2 + (d + kv) * 2 + 3 * (d + f))
    # the 8B teachers (exact) and the 32B one (Qwen3-32B's card: 32.8B; 31.2B without the embeddings)
    assert all(t["params"] == 8_190_735_360 for t in p.teachers.values())
    for name, r in (p.roles or {}).items():
        if name not in ("learner", "sampler"):
            assert r["devices"] == 16 and r["weight_bytes_per_device"] * 16 / 2 == pytest.approx(32.8e9, rel=2e-3)
    assert p.activation_bytes_per_device > 0  # the compiled step's temporaries are counted
    assert p.total_bytes_per_device <= 0.8 * mc.device_memory_gb * GiB
    one = plan(load_config(path, ["mesh.fsdp=1", "mesh.roles={}"]), n_devices=1)  # shapes only, one chip
    # sharding divides what is sharded: the update's arguments and the slots' KV (the rollout weight copy is
    # whole on every chip by design: a decode step then moves no weights)
    assert p.compiled_argument_bytes_per_device < one.total_bytes_per_device / (devices / 2)
    assert p.slot_bytes_per_device <= one.kv_cache_bytes_per_device / devices * 1.01
    assert p.rollout_weight_bytes_per_device == p.student_weight_bytes
    assert p.decode_collective_bytes_per_step < 1e-3 * p.student_weight_bytes


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
