"""Orbax checkpoints of the whole train state: student params, optimizer state, RNG, data position, step.

Saved synchronously through a `CheckpointManager` (an interrupted save leaves no finalized step, so
`restore` picks the last complete one). Multi-process: every process calls save/restore; Orbax
coordinates the writes.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from opd_jax.errors import OpdError


def manager(folder: str | Path, keep: int = 2) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(folder).absolute(), options=opts)


def save(mgr: ocp.CheckpointManager, step: int, state: dict):
    mgr.save(step, args=ocp.args.StandardSave(state))
    mgr.wait_until_finished()


def restore_latest(mgr: ocp.CheckpointManager, like: dict, step: int | None = None):
    """(step, state) of the newest complete checkpoint (or of `step`), shaped and sharded like `like`;
    None if there is none."""
    if step is None:
        step = mgr.latest_step()
        if step is None:
            return None
    elif step not in mgr.all_steps():
        raise OpdError(f"no checkpoint for step {step} in {mgr.directory} (have {sorted(mgr.all_steps())})")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        state = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint must be named, not crash obscurely
        raise OpdError(f"checkpoint step {step} in {mgr.directory} cannot be restored (corrupt or from a different "
                       f"config): {str(e).splitlines()[0][:200]}") from None
    return step, state
