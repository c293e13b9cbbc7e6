"""Per-phase wall time of a training step: sample, teacher, update, host.

JAX dispatches device work asynchronously, so a phase's time is only its device time when the host
waits for its outputs. `PhaseTimer(sync=True)` waits at every phase boundary (the trainer does this
on log steps only); with sync=False it records nothing and never waits, so the other steps run with
no host round-trip.
"""

from __future__ import annotations

import time

import jax


class PhaseTimer:
    def __init__(self, sync: bool):
        self.sync = sync
        self.start = self.last = time.perf_counter()
        self.times: dict[str, float] = {}

    def mark(self, phase: str, *outputs):
        """End `phase` (it began at the previous mark): wait for `outputs` when syncing, add the wall
        time since the previous mark to the phase. Returns the outputs unchanged."""
        if self.sync:
            jax.block_until_ready(outputs)
            now = time.perf_counter()
            self.times[phase] = self.times.get(phase, 0.0) + now - self.last
            self.last = now
        return outputs[0] if len(outputs) == 1 else outputs

    def record(self) -> dict:
        """{"time/<phase>": seconds, "time/step": total}; host time is everything not in a device phase."""
        if not self.sync:
            return {}
        total = time.perf_counter() - self.start
        out = {f"time/{k}": v for k, v in self.times.items() if k != "host"}
        out["time/host"] = total - sum(out.values())
        out["time/step"] = total
        return out


NO_TIMER = PhaseTimer(sync=False)
