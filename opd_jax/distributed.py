"""Multi-host: start JAX's multi-controller runtime, and move host data in and out of global arrays.

Every process runs the same program. On Cloud TPU VMs `jax.distributed.initialize()` finds its peers
by itself; elsewhere (GPU clusters, or two local CPU processes in the tests) the coordinator address,
process count and process id come from the config (`distributed.*`) or the environment
(OPD_JAX_COORDINATOR, OPD_JAX_NUM_PROCESSES, OPD_JAX_PROCESS_ID). CPU processes talk over gloo.

Host data (prompts, rewards) is a pure function of (seed, step), so every process could build the
whole batch; each one hands JAX only the rows its own devices hold
(`jax.make_array_from_process_local_data`). Small results that the host needs whole (sampled tokens
for decoding and rewards) are gathered with `process_allgather`.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from opd_jax.errors import OpdError

_STARTED = False


def on_tpu_vm() -> bool:
    """True on a Cloud TPU VM (its metadata sets these variables for every worker)."""
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_ACCELERATOR_TYPE")
                or os.environ.get("CLOUD_TPU_TASK_ID"))


def initialize(dc=None) -> bool:
    """Start the multi-controller runtime when this run spans processes; returns True if it did.

    dc: a DistributedConfig (coordinator, num_processes, process_id) or None. Explicit values win,
    then the OPD_JAX_* environment, then TPU auto-detection. A single process does nothing.
    """
    global _STARTED
    if _STARTED:
        return True
    coord = (dc.coordinator if dc else None) or os.environ.get("OPD_JAX_COORDINATOR")
    nproc = (dc.num_processes if dc else None) or os.environ.get("OPD_JAX_NUM_PROCESSES")
    pid = dc.process_id if dc and dc.process_id is not None else os.environ.get("OPD_JAX_PROCESS_ID")
    if coord:
        if nproc is None or pid is None:
            raise OpdError("distributed.coordinator is set, so distributed.num_processes and distributed.process_id "
                           "(or OPD_JAX_NUM_PROCESSES / OPD_JAX_PROCESS_ID) must be set too")
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coord, num_processes=int(nproc), process_id=int(pid))
    elif on_tpu_vm() and int(os.environ.get("OPD_JAX_SINGLE_HOST", "0")) == 0:
        jax.distributed.initialize()
    else:
        return False
    _STARTED = True
    return True


def is_main() -> bool:
    """Process 0 writes logs, plots and the progress bar."""
    return jax.process_index() == 0


def local_rows(sharding, global_shape) -> np.ndarray:
    """Indices of the leading-axis rows that this process's devices hold under `sharding`."""
    rows = set()
    for idx in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows.update(range(*idx[0].indices(global_shape[0])))
    return np.asarray(sorted(rows), np.int64)


def to_global(x, sharding):
    """A global jax.Array with `sharding` from host data `x` that every process knows in full;
    each process contributes only its own rows (the rest of `x` is never copied to a device)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    rows = local_rows(sharding, x.shape)
    if len(rows) == x.shape[0]:  # replicated over the rows: every process holds them all
        return jax.make_array_from_process_local_data(sharding, x, x.shape)
    return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)


def to_host(x) -> np.ndarray:
    """The whole of a (possibly multi-process) array as numpy, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def put_global(tree, shardings):
    """Place host-identical data (numpy or single-device arrays every process computed the same way,
    e.g. weights initialised from one seed) with `shardings`. Each process fills only its own shards
    (`make_array_from_callback`), so there is no cross-process equality check or transfer."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    # `shardings` may be a prefix of `tree` (one sharding per nnx.Variable, say)
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: one(x, s), sub), shardings, tree)
