"""The LoRA recipe planned against full fine-tuning (docs/tpu.md, "LoRA against full fine-tuning").

Plans configs/recipes/qwen3_8b_lora_from_32b.yaml on config-only model folders (as
tests/test_tpu_recipes.py writes them), compiled, for 2, 4 and 8 learner chips (the 32B teacher on 16
chips of its own), with the adapters and with full fine-tuning (student.lora={}), at the recipe's 128
rollout slots and at 256. Each plan runs in its own process faking the devices; one JSON line each.

    python scripts/plan_lora_vs_full.py
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "qwen3_8b_lora_from_32b.yaml"
ONE = """
import json, os, sys, tempfile
from pathlib import Path
from opd_jax.config import load_config
from opd_jax.models.released import config_only_recipe
from opd_jax.plan import GiB, plan
recipe, chips, learner, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
tmp = Path(tempfile.mkdtemp())
path = tmp / "recipe.yaml"
path.write_text(config_only_recipe(Path(recipe).read_text(), tmp / "models"))
roles = f"mesh.roles={{learner: 0-{learner - 1}, sampler: 0-{learner - 1}, qwen3_32b: {learner}-{learner + 15}}}"
p = plan(load_config(path, [f"mesh.fsdp={learner}", roles, *extra]), n_devices=chips, compile=True)
print(json.dumps({"learner_chips": learner, "overrides": extra, "trainable_params": p.trainable_params,
                  "optimizer_gib": round(p.optimizer_bytes_per_device / GiB, 2),
                  "update_phase_gib": round(p.update_phase_bytes_per_device / GiB, 2),
                  "activations_gib": round(p.activation_bytes_per_device / GiB, 2),
                  "rollout_phase_gib": round(p.rollout_phase_bytes_per_device / GiB, 2),
                  "fullest_chip_gib": round(p.total_bytes_per_device / GiB, 2),
                  "fits": p.total_bytes_per_device <= 0.8 * 95 * GiB}))
"""


def main():
    rows = [(learner, lora, slots) for learner in (2, 4, 8) for slots in (128, 256) for lora in (True, False)]
    for learner, lora, slots in rows:
        extra = [f"data.rollout_slots={slots}"] + ([] if lora else ["student.lora={}"])
        chips = learner + 16
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={chips}"}
        out = subprocess.run([sys.executable, "-c", ONE, str(RECIPE), str(chips), str(learner), *extra],
                             capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
        line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else json.dumps(
            {"learner_chips": learner, "overrides": extra, "error": out.stderr.strip().splitlines()[-1]})
        print(line, flush=True)


if __name__ == "__main__":
    main()
