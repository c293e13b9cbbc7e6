"""`opd_jax.hooks` in isolation, with fake contexts: the skip counter's reads and its stop, when
checkpoints are written (and that skip flags are read first), and the samples.jsonl rows. The Logger,
StopRateGuard and HorizonTrace are exercised by the runs in test_train / test_stop_rate / test_horizon."""

import numpy as np
import pytest

from opd_jax.errors import OpdError
from opd_jax.hooks import Checkpoints, SkipCounter, StepContext, sample_rows
from opd_jax.tasks.domains import Example


class _Device:
    """A value that counts how often the host reads it (float())."""
    reads = 0

    def __init__(self, v):
        self.v = v

    def __float__(self):
        _Device.reads += 1
        return float(self.v)


def _ctx(step, *, skipped=0, loss=0.5, ratio=1.0, log=False):
    metrics = {"loss": _Device(loss), "skipped": _Device(skipped), "update_ratio": _Device(ratio)}
    return StepContext(step=step, state=f"state{step}", batch=None, metrics=metrics, timer=None, log=log,
                       evaluating=False)


def test_skip_flags_are_read_only_at_log_steps_and_counted():
    counter = SkipCounter(max_skipped=3)
    _Device.reads = 0
    for step, skip in enumerate([1, 0, 1]):
        counter.after_step(_ctx(step, skipped=skip))
    assert _Device.reads == 0  # nothing read back on plain steps
    log = _ctx(3, skipped=1, log=True)
    counter.after_step(log)
    assert log.record["skipped_steps"] == 3.0 and counter.unread == [] and counter.in_a_row == 2


@pytest.mark.parametrize("loss,ratio,why", [(float("nan"), 1.0, "loss is nan"),
                                            (0.5, 40.0, "multiplied the parameters' norm by 40"),
                                            (0.5, float("inf"), "gradient or the update is not finite")])
def test_the_run_stops_after_max_skipped_in_a_row_with_the_reason(loss, ratio, why):
    counter = SkipCounter(max_skipped=2)
    counter.after_step(_ctx(0, skipped=1, loss=loss, ratio=ratio))
    counter.after_step(_ctx(1, skipped=0))  # a good step resets the count
    counter.after_step(_ctx(2, skipped=1, loss=loss, ratio=ratio))
    counter.flush()
    counter.after_step(_ctx(3, skipped=1, loss=loss, ratio=ratio))
    with pytest.raises(OpdError, match=f"{why}.* at step 4 \\(2 skipped step\\(s\\) in a row, train.max_skipped=2\\)"):
        counter.flush()


class _Manager:
    def __init__(self):
        self.saved = {}

    def save(self, step, args):
        self.saved[step] = args

    def wait_until_finished(self):
        pass

    def latest_step(self):
        return max(self.saved) if self.saved else None


class _Preemption:
    def __init__(self, at=None):
        self.at = at

    def reached(self, step):
        return step == self.at


class _Skips:
    def __init__(self, log):
        self.log = log

    def flush(self):
        self.log.append("flush")


def test_checkpoints_every_n_at_the_last_step_and_on_sigterm(monkeypatch, capsys):
    import opd_jax.hooks as hooks

    events = []
    monkeypatch.setattr(hooks.ckpt, "save", lambda mgr, step, state: events.append(("save", step, state)))
    hook = Checkpoints(_Manager(), every=3, last=7, preemption=_Preemption(at=5), skips=_Skips(events))
    stops = []
    for step in range(7):
        ctx = _ctx(step)
        hook.after_step(ctx)
        stops.append(ctx.stop)
        if ctx.stop:
            break
    # done = 3 (every 3) and 5 (SIGTERM, then stop); each save after a skip-flag read
    assert events == ["flush", ("save", 3, "state2"), "flush", ("save", 5, "state4")]
    assert stops == [False, False, False, False, True] and "saved step 5" in capsys.readouterr().out
    events.clear()
    hook = Checkpoints(_Manager(), every=3, last=7, preemption=_Preemption(), skips=_Skips(events))
    for step in range(7):
        hook.after_step(_ctx(step))
    assert [e[1] for e in events if e != "flush"] == [3, 6, 7]


def test_an_abandoned_step_saves_the_last_finished_state_once(monkeypatch, capsys):
    import opd_jax.hooks as hooks

    mgr = _Manager()
    monkeypatch.setattr(hooks.ckpt, "save", lambda m, step, state: m.saved.__setitem__(step, state))
    hook = Checkpoints(mgr, every=10, last=20, preemption=_Preemption(), skips=_Skips([]))
    hook.abandoned(4, "s4")
    assert mgr.saved == {4: "s4"} and "checkpoint at step 4 stands" in capsys.readouterr().out
    hook.abandoned(4, "other")  # already saved: not written again
    assert mgr.saved == {4: "s4"}
    fresh = Checkpoints(_Manager(), every=10, last=20, preemption=_Preemption(), skips=_Skips([]))
    fresh.abandoned(0, "s0")  # no step finished: nothing to save
    assert fresh.mgr.saved == {} and "no checkpoint was written" in capsys.readouterr().out


def test_sample_rows_carry_the_rendered_prompt_reward_and_divergence():
    class Prompter:
        def text(self, ex):
            return f"<user>{ex.prompt}</user>"

    exs = [Example("2+2=", "4", "addition"), Example("abc", "cba", "reverse")]
    rows = sample_rows(Prompter(), "on_policy", exs, ["4", "cab"], np.array([1.0, 0.0]), np.array([0.25, 1.5]))
    assert rows == [
        {"source": "on_policy", "domain": "addition", "prompt": "<user>2+2=</user>", "completion": "4",
         "answer": "4", "reward": 1.0, "divergence": 0.25},
        {"source": "on_policy", "domain": "reverse", "prompt": "<user>abc</user>", "completion": "cab",
         "answer": "cba", "reward": 0.0, "divergence": 1.5}]
    assert [r["divergence"] for r in sample_rows(Prompter(), "greedy_eval", exs, ["", ""], [0, 0])] == [None, None]
