"""Preemption: spot and queued-resource TPU VMs get SIGTERM shortly before they are taken away.

`Preemption` answers `reached(step)` after every step: True when the run should write a checkpoint
now and stop (the trainer then exits 0, and `--resume` continues bit-exactly).
  - One process: a SIGTERM handler (installed for the duration of the `with` block) sets a flag; the
    step in flight finishes first.
  - A call that waits on something outside the process (a served teacher, `opd_jax.serving`) polls
    `STOP`, set by the same handler, and raises `StepAbandoned` within a fraction of a second: the
    trainer abandons that step and keeps the last finished one (`Checkpoints.abandoned`).
  - Several processes (`jax.distributed`): JAX's preemption service receives the signal and agrees on
    one step for every process (`multihost_utils.reached_preemption_sync_point`), so all of them save
    the same step and none waits for a peer that has stopped.
"""

from __future__ import annotations

import signal
import threading


STOP = threading.Event()  # set by the SIGTERM handler while a `Preemption` block is active


class StepAbandoned(BaseException):
    """SIGTERM arrived while a step waited on something outside the process (a served teacher): the
    step is abandoned (a BaseException, so no `except Exception` on the way re-words it)."""


class Preemption:
    def __init__(self):
        from jax._src import distributed

        self.multi = distributed.global_state.client is not None
        self.signalled = False
        self._previous = None

    def __enter__(self):
        STOP.clear()
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        self.signalled = True
        STOP.set()

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        STOP.clear()
        return False

    def reached(self, step: int) -> bool:
        """Call after every step (every process, same steps): save and stop when True."""
        if self.multi:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signalled

