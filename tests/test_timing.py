"""`opd_jax.timing.PhaseTimer`: a syncing timer returns from a phase only once its outputs exist and
charges the phase at least their compute time; a timer that does not sync never waits and records
nothing."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.timing import NO_TIMER, PhaseTimer


def _controlled(log, *, sleep=0.0):
    """A jitted identity whose device work sleeps `sleep` s, then appends its finish time to `log`."""
    def work(v):
        time.sleep(sleep)
        log.append(time.perf_counter())
        return v
    return jax.jit(lambda x: jax.pure_callback(work, jax.ShapeDtypeStruct(x.shape, x.dtype), x))


def test_phase_times_wait_for_their_outputs_and_sum_to_the_step():
    log = []
    slow, slower = _controlled(log, sleep=0.2), _controlled(log, sleep=0.3)
    slow(jnp.ones(3)).block_until_ready(), slower(jnp.ones(2)).block_until_ready()  # compiled first
    log.clear()
    t0 = time.perf_counter()
    timer = PhaseTimer(sync=True)
    out = timer.mark("sample", slow(jnp.ones(3)))
    assert len(log) == 1 and log[0] <= time.perf_counter()  # the work had finished when mark returned
    time.sleep(0.1)
    timer.mark("host")
    a, b = timer.mark("update", slower(jnp.ones(2)), jnp.zeros(1))
    assert len(log) == 2
    rec = timer.record()
    wall = time.perf_counter() - t0
    np.testing.assert_array_equal(np.asarray(out), np.ones(3))  # outputs come back unchanged
    assert a.shape == (2,) and b.shape == (1,)
    assert rec["time/sample"] >= 0.2 and rec["time/update"] >= 0.3
    assert rec["time/host"] == pytest.approx(rec["time/step"] - rec["time/sample"] - rec["time/update"])
    assert rec["time/host"] >= 0.1 and rec["time/step"] <= wall
    assert set(rec) == {"time/sample", "time/update", "time/host", "time/step"}


def test_a_timer_that_does_not_sync_never_waits_and_records_nothing(monkeypatch):
    """XLA:CPU runs a host callback inside the dispatch, so "never waits" is checked at the one place a
    timer can wait: jax.block_until_ready is never called, while a syncing timer calls it per phase."""
    import opd_jax.timing as timing

    waited = []
    monkeypatch.setattr(timing.jax, "block_until_ready", lambda x: waited.append(x) or x)
    x = jnp.ones(3)
    assert NO_TIMER.mark("sample", x) is x and NO_TIMER.mark("update", x, x) == (x, x)
    assert waited == [] and NO_TIMER.record() == {} and NO_TIMER.times == {}
    PhaseTimer(sync=True).mark("sample", x)
    assert len(waited) == 1 and waited[0][0] is x
