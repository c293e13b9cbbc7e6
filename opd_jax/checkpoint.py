"""Orbax checkpoints of the whole `TrainState`: student params, optimizer state, step, RNG, data position,
horizon state.

Saved synchronously through a `CheckpointManager` (an interrupted save leaves no finalized step).
Restoring falls back: when the newest checkpoint cannot be read (a damaged file), it is named in a
warning and the newest one that can be read is restored. Multi-process: every process calls
save/restore; Orbax coordinates the writes.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from opd_jax.errors import OpdError


def manager(folder: str | Path, keep: int = 2) -> ocp.CheckpointManager:
    if keep < 1:
        raise OpdError(f"train.keep_checkpoints must be >= 1 (0 would delete every checkpoint), got {keep}")
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(folder).absolute(), options=opts)


SCALARS = ("step", "rng", "data_position", "horizon")  # saved as host numpy values, identical on every process


def saved_form(state) -> dict:
    """A TrainState as its checkpoint holds it: arrays as they are placed, the replicated scalars (step,
    RNG key data, data position) as host numpy values, so a checkpoint written by several processes
    restores on any topology."""
    import numpy as np

    out = {k: v for k, v in state._asdict().items() if v is not None}  # a hand-built state may have no horizon
    for k in SCALARS:
        if k not in out:
            continue
        x = out[k]
        out[k] = np.asarray(x.addressable_shards[0].data if isinstance(x, jax.Array) else x)
    return out


def placed_state(cls, restored: dict, shardings):
    """A TrainState from a dict with host scalars (a restored checkpoint, or a fresh step-0 state), the
    scalars placed like `shardings`' (replicated; every process fills its own copy)."""
    from opd_jax.distributed import put_global

    have = [k for k in SCALARS if k in restored]
    scalars = put_global({k: restored[k] for k in have}, {k: getattr(shardings, k) for k in have})
    return cls(**{**restored, **scalars})


def save(mgr: ocp.CheckpointManager, step: int, state):
    """Save a TrainState (or a dict already in `saved_form`) as checkpoint `step`, synchronously."""
    mgr.save(step, args=ocp.args.StandardSave(state if isinstance(state, dict) else saved_form(state)))
    mgr.wait_until_finished()


def _reason(e: Exception) -> str:
    """The first sentence of a restore error, without the bound-method and C++ fragments TensorStore
    appends."""
    text = " ".join(str(e).split())
    text = re.split(r"\s*(?:<bound method|\[source locations=|\(?pybind11)", text)[0].strip(" :;,")
    return (text[:160].rsplit(" ", 1)[0] + " ...") if len(text) > 160 else (text or type(e).__name__)


def _restore(mgr, step: int, like: dict):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_latest(mgr: ocp.CheckpointManager, like: dict, step: int | None = None):
    """(step, state) shaped and sharded like `like`: the checkpoint of `step` if given, else the
    newest one that can be restored (a damaged newer one is named in a warning and skipped); None
    when the folder holds no checkpoint."""
    steps = sorted(mgr.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise OpdError(f"there is no checkpoint for step {step} in {mgr.directory} "
                           f"(it holds steps {sorted(steps) or 'none'})")
        try:
            return step, _restore(mgr, step, like)
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint must be named, not crash obscurely
            raise OpdError(f"checkpoint step {step} in {mgr.directory} cannot be restored (damaged, or written by "
                           f"a different config): {_reason(e)}") from None
    failed = []
    for s in steps:
        try:
            state = _restore(mgr, s, like)
        except Exception as e:  # noqa: BLE001
            failed.append((s, _reason(e)))
            continue
        for bad, why in failed:  # kept, renamed, so the resumed run can save that step again
            aside = Path(mgr.directory) / f"damaged_step_{bad}"
            warnings.warn(f"checkpoint step {bad} in {mgr.directory} cannot be restored ({why}); resuming from "
                          f"step {s} instead (the damaged one is kept as {aside.name})", stacklevel=2)
            if jax.process_index() == 0:
                (Path(mgr.directory) / str(bad)).rename(aside)
        if failed:
            mgr.reload()
        return s, state
    if failed:
        s, why = failed[0]
        raise OpdError(f"no checkpoint in {mgr.directory} can be restored; the newest, step {s}, fails with: {why} "
                       "(damaged, or written by a different config)")
    return None
