"""Shared by the experiment scripts: run one OPD arm of the demo's task and read its curves."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from opd_jax.demo import opd_config
from flax import nnx

from opd_jax.export import restore_run_params
from opd_jax.train import train


def run_arm(prep, out_dir, *, steps: int, seed: int, **sections) -> dict:
    """Train the demo's OPD stage with some config sections replaced (loss=dict(...), optim=dict(...),
    data=dict(...), train=dict(...)); returns the trainer, final accuracy, per-step curves, seconds."""
    t0 = time.time()
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = opd_config(prep, out_dir, steps=steps, seed=seed)
    # every step logged: the curves below are per step (steps_to counts records)
    sections = {"train": {"progress": False, "eval_every": max(steps // 6, 1), "log_every": 1, **sections.get("train", {})},
                **{k: v for k, v in sections.items() if k != "train"}}
    cfg = dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})
    train(cfg)
    graphdef, params, _ = restore_run_params(out_dir)
    recs = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"params": params, "accuracy": prep["accuracy"](nnx.merge(graphdef, params)),
            "divergence": [r.get("on_policy/divergence", np.nan) for r in recs],
            "reward": [r.get("reward", np.nan) for r in recs],
            "eval": [(r["step"], r["eval/mean/accuracy"]) for r in recs if "eval/mean/accuracy" in r],
            "records": recs, "seconds": round(time.time() - t0, 1)}


def smooth(x, w: int = 20) -> np.ndarray:
    """Trailing moving average (window w, shorter at the start)."""
    x = np.asarray(x, float)
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(i - w, 0)
    return (c[i] - c[lo]) / (i - lo)


def summary(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.3f} ± {v.std():.3f}"
