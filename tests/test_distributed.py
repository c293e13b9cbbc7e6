"""The multi-controller runtime's start-up settings (the two-process runs are in test_multihost)."""

import pytest


def test_distributed_start_needs_all_three_settings(monkeypatch):
    from opd_jax import OpdError
    from opd_jax.config import DistributedConfig
    from opd_jax.distributed import initialize

    for k in ("OPD_JAX_COORDINATOR", "OPD_JAX_NUM_PROCESSES", "OPD_JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(OpdError, match="num_processes and distributed.process_id"):
        initialize(DistributedConfig(coordinator="127.0.0.1:1"))
    assert initialize(DistributedConfig()) is False  # one process, not on a TPU VM: nothing to start
