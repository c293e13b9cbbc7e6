"""Per-chip memory of the compiled OPD step at real shapes, from config-only model folders (no weights).

Compiles the trainer's own step for the recipe's mesh on fake CPU devices (`opd_jax.plan`, XLA's
memory analysis) at several answer lengths and prints per-chip bytes and the growth factor, for the
settings given (for example the old plain attention without remat against the defaults):

    python scripts/bench_step_memory.py --recipe configs/recipes/qwen3_1p7b_from_8b.yaml --devices 16 \
        --new 1024 2048 --set student.attention=naive train.remat=none
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--devices", type=int, default=16)
    ap.add_argument("--new", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--layers", type=int, default=None, help="override every model's depth (compile time)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, key.sub=value")
    args = ap.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from opd_jax.config import load_config
    from opd_jax.models.released import config_only_recipe
    from opd_jax.plan import GiB, plan

    with tempfile.TemporaryDirectory() as tmp:
        text = config_only_recipe(Path(args.recipe).read_text(), Path(tmp), args.layers)
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(text)
        print(f"recipe {args.recipe}, {args.devices} devices, layers {args.layers or 'as released'}, "
              f"overrides {args.set or 'none'}")
        print(f"{'new tokens':>10} {'activations GiB':>16} {'arguments GiB':>14} {'total GiB':>10} {'hand total':>10} "
              f"{'growth':>7} {'compile s':>9}")
        prev = None
        for n in args.new:
            cfg = load_config(recipe, [*args.set, f"data.max_new_tokens={n}"])
            t0 = time.time()
            p = plan(cfg, n_devices=args.devices, compile=True)
            act = p.activation_bytes_per_device
            growth = f"{act / prev:.2f}x" if prev else ""
            hand = sum(getattr(p, k) for k in ("student_bytes_per_device", "optimizer_bytes_per_device", "teacher_bytes_per_device",
                                      "kv_cache_bytes_per_device", "teacher_output_bytes_per_device")) + act
            print(f"{n:>10} {act / GiB:>16.2f} {p.compiled_argument_bytes_per_device / GiB:>14.2f} "
                  f"{p.total_bytes_per_device / GiB:>10.2f} {hand / GiB:>10.2f} {growth:>7} {time.time() - t0:>9.0f}",
                  flush=True)
            prev = act


if __name__ == "__main__":
    sys.exit(main())
