"""One of two processes in test_multihost: 4 fake CPU devices, gloo collectives, the tiny config.

    python tests/multihost_worker.py PROCESS_ID PORT OUT_DIR OVERRIDES_JSON [preempt]
Trains 2 steps (runtime started from the OPD_JAX_* environment), then resumes from the Orbax checkpoint
written by both processes for the third. With `preempt`: one run, which the test stops with SIGTERM.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("OPD_TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from opd_jax.config import load_config  # noqa: E402
from opd_jax.train import train  # noqa: E402


def main():
    pid, port, out, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    os.environ.update(OPD_JAX_COORDINATOR=f"127.0.0.1:{port}", OPD_JAX_NUM_PROCESSES="2", OPD_JAX_PROCESS_ID=str(pid))
    cfg = load_config(None, overrides + [f"train.out_dir={out}"])
    if sys.argv[5:] == ["preempt"]:  # one run that the test interrupts with SIGTERM
        train(cfg)
        print(json.dumps({"process": pid, "done": True}), flush=True)
        return
    train(cfg, stop_after=2)
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    last = train(cfg, resume=True)
    print(json.dumps({"process": pid, "loss": last["loss"]}), flush=True)


if __name__ == "__main__":
    main()
