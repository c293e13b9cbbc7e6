"""The OPD loop: rollouts -> update -> hooks, over a `Run` built once.

    run = build_run(cfg)                                   # opd_jax.run
    state = run.init (or the checkpoint's TrainState)
    for step in range(start, end):
        batch = run.rollouts.collect(step, state)          # opd_jax.rollouts: sample, score, reward
                                                           # (train.max_staleness >= 1: taken from the
                                                           # sampler thread, opd_jax.pipeline)
        state, metrics = run.update(state, batch.arrays)   # opd_jax.train_step: pure, jitted
        for hook in hooks: hook.after_step(ctx)            # opd_jax.hooks / opd_jax.guard

Every step's prompts and sampling key are pure functions of (seed, step), and the checkpoint is the
whole TrainState (params, optimizer state, step, RNG, data position), so a run resumed from step k
continues exactly as the uninterrupted run would have. `train` also owns the run folder: one writer
at a time (a lock), its config.yaml kept on resume, and nothing written before a setup error.
"""

from __future__ import annotations

import gc
import shutil
import signal
import threading
from pathlib import Path

import jax

from opd_jax import checkpoint as ckpt
from opd_jax import distributed as dist
from opd_jax.checks import check
from opd_jax.config import Config, to_dict
from opd_jax.errors import OpdError
from opd_jax.export import export_student, restore_run_params  # noqa: F401 - public names kept here too
from opd_jax.guard import EffOPDGuard, check_guard
from opd_jax.hooks import Checkpoints, HorizonTrace, Logger, Progress, SkipCounter, StepContext, StopRateGuard
from opd_jax.pipeline import Pipeline
from opd_jax.metrics import MetricsWriter, SamplesWriter, plot_metrics
from opd_jax.preemption import Preemption, StepAbandoned
from opd_jax.run import Run, build_run, build_student  # noqa: F401 - build_student: public name kept here
from opd_jax.run_folder import RunLock, check_resume_config, check_writable, input_paths, write_config
from opd_jax.timing import PhaseTimer


def train_loop(run: Run, state, hooks: list, *, start: int, end: int):
    """Steps start..end-1 of `run` from `state`; returns the last state. Log steps (train.log_every,
    eval steps and the last step) wait for the previous step and time each phase; the others are
    dispatched asynchronously."""
    tc = run.cfg.train
    pipe = Pipeline(run, state, start=start, end=end) if tc.max_staleness else None  # asynchronous OPD
    try:
        for step in range(start, end):
            done = step + 1
            evaluating = done % tc.eval_every == 0 or done == tc.steps
            log = evaluating or done % tc.log_every == 0 or done == end
            if log:  # earlier steps' queued work is not this step's phases
                jax.block_until_ready(state)
            timer = PhaseTimer(sync=log)
            try:
                if pipe is None:
                    batch = run.rollouts.collect(step, state, timer=timer)  # texts when needed: needs_texts(step)
                else:  # sampled (and scored) by the sampler thread while the previous update ran
                    batch = pipe.take(step)
                    timer.mark("rollout_wait")
            except StepAbandoned:  # SIGTERM while a served teacher was answering: keep the last finished step
                for hook in hooks:
                    getattr(hook, "abandoned", lambda *a: None)(step, state)
                break
            teacher_w = run.teacher_w if run.live_w is None else run.live_w(state.params)  # self_live: current
            state, metrics = timer.mark("update", *run.update(state, batch.arrays, teacher_w))
            if pipe is not None:
                pipe.publish(done, state.params)  # before the next update donates them
            ctx = StepContext(step, state, batch, metrics, timer, log, evaluating)
            for hook in hooks:
                hook.after_step(ctx)
            state = ctx.state
            if ctx.stop:
                break
    finally:
        if pipe is not None:
            pipe.close()
    return state


class _Terminated(BaseException):
    """SIGTERM during setup (a BaseException, so no `except Exception` on the way can re-word it)."""


def _setup_signal(seen: threading.Event):
    """During setup, SIGTERM ends the process with a one-line message (the loop then installs its
    own handler, which finishes the step in flight and saves it). The handler raises where the signal
    lands; Python swallows an exception raised inside a gc callback (JAX registers one), so it also
    sets `seen`, which setup checks once more before training starts."""
    from jax._src import distributed

    if threading.current_thread() is not threading.main_thread() or distributed.global_state.client is not None:
        return None  # several processes: JAX's preemption service owns SIGTERM

    def on_term(signum, frame):
        seen.set()
        if frame is not None and frame.f_code in {getattr(cb, "__code__", None) for cb in gc.callbacks}:
            return  # inside a gc callback an exception would be printed and ignored: the check after setup stops
        raise _Terminated()

    return signal.signal(signal.SIGTERM, on_term)


def train(cfg: Config, *, resume: bool = False, resume_step: int | None = None, stop_after: int | None = None) -> dict:
    """Run (or resume) training from a config; returns the last log step's record."""
    check(cfg)  # every configuration check, before the run folder is touched
    out = Path(cfg.train.out_dir)
    check_writable(out, input_paths(cfg))
    dist.initialize(cfg.distributed)
    created = not out.exists()
    terminated = threading.Event()
    previous, lock = _setup_signal(terminated), None
    try:
        lock = RunLock(out).acquire() if dist.is_main() else None
        mgr = ckpt.manager(out / "checkpoints", cfg.train.keep_checkpoints) if (out / "checkpoints").exists() else None
        if not resume and mgr is not None and mgr.latest_step() is not None:
            raise OpdError(f"{out} already holds checkpoints (step {mgr.latest_step()}); pass --resume to continue "
                           "or set train.out_dir to a new folder")
        if resume and (mgr is None or not mgr.all_steps()):
            raise OpdError(f"--resume given but {out / 'checkpoints'} holds no checkpoint")
        if resume:
            check_resume_config(out, to_dict(cfg))
        run = build_run(cfg, checked=True)
        state, start = run.init, 0
        if resume:
            restored = ckpt.restore_latest(mgr, ckpt.saved_form(run.init), step=resume_step)
            start = int(restored[0])
            if cfg.train.steps < start:
                raise OpdError(f"train.steps={cfg.train.steps} is below the {start} steps the checkpoint has "
                               "already done")
            if int(restored[1]["data_position"]) != start:
                raise OpdError(f"checkpoint step {start} is at data position {int(restored[1]['data_position'])}; "
                               "they must agree")
            state = ckpt.placed_state(type(run.init), restored[1], run.state_sh)
        if terminated.is_set():  # the handler's exception was swallowed on the way (a gc callback)
            raise _Terminated()
    except BaseException as e:
        if lock is not None:
            lock.release()
            if created and out.exists() and not any(out.iterdir()):
                shutil.rmtree(out, ignore_errors=True)  # a refused run leaves nothing behind
        if isinstance(e, _Terminated):
            raise OpdError("stopped by SIGTERM during setup, before the first step; no checkpoint was written") from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    try:
        return _train(run, state, start, out, resume, stop_after, mgr)
    finally:
        if lock is not None:
            lock.release()


def _train(run: Run, state, start: int, out: Path, resume: bool, stop_after: int | None, mgr=None) -> dict:
    cfg, tc = run.cfg, run.cfg.train
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_config(out, to_dict(cfg))
        if run.tokenizer.name_or_path == "":  # the built-in tokenizer: kept with the run (export uses it)
            run.tokenizer.save_pretrained(out / "tokenizer")
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    mgr = mgr or ckpt.manager(out / "checkpoints", tc.keep_checkpoints)  # a new run's folder is made here
    resume_step = start if resume else None
    skips = SkipCounter(tc.max_skipped)
    hooks: list = []
    if check_guard(cfg.optim, bool(run.teachers)):
        hooks.append(EffOPDGuard(run.rollouts, run.graphdef, run.spec, run.teacher_w, run.state_sh.params, cfg.optim,
                                 state.key(), state.params))
    logger = Logger(run, MetricsWriter(out, resume_step=resume_step), SamplesWriter(out, resume_step=resume_step))
    hooks += [skips, logger]
    if run.rollouts.progressive is not None:
        hooks.append(HorizonTrace(run.rollouts.progressive, run.state_sh.horizon, out, resume_step))
    if tc.min_eos_rate > 0:
        hooks.append(StopRateGuard(tc.min_eos_rate, tc.eos_patience))
    if tc.progress and dist.is_main():
        hooks.append(Progress(tc.steps, start))
    try:
        with Preemption() as preemption:
            hooks.append(Checkpoints(mgr, tc.checkpoint_every, tc.steps, preemption, skips))
            train_loop(run, state, hooks, start=start, end=end)
    finally:
        for hook in hooks:
            if hasattr(hook, "close"):
                hook.close()
    if end == tc.steps and dist.is_main():
        plot_metrics(out / "metrics.jsonl", out / "plots")
    return logger.last
