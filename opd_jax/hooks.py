"""What happens around each update, as hooks the loop calls in order after every step.

A hook is an object with `after_step(ctx)` (and optionally `close()`); it reads the `StepContext`
and may set `ctx.state` (the EffOPD guard), add to `ctx.record` (what a log step writes) or set
`ctx.stop`. Only log steps read anything back from the devices; the other steps stay asynchronous.

    SkipCounter   reads the on-device skip flags at log and checkpoint steps; stops a run after
                  train.max_skipped skipped updates in a row
    Logger        log steps: loss, metrics, phase times, tokens/s, rewards, stop rate; eval steps:
                  greedy accuracy and samples.jsonl; metrics.jsonl and TensorBoard
    StopRateGuard stops a run whose completions no longer end with a stop id (train.min_eos_rate)
    Progress      the progress bar
    Checkpoints   saves the TrainState every train.checkpoint_every steps, at the end, and on SIGTERM
                  (then stops the run cleanly)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from opd_jax import checkpoint as ckpt
from opd_jax import distributed as dist
from opd_jax.errors import OpdError


@dataclass
class StepContext:
    step: int  # the step just taken (0-based); done = step + 1 updates have run
    state: object  # TrainState after the update (a hook may replace it)
    batch: object  # batch.Batch
    metrics: dict  # the update's metrics, on device
    timer: object  # timing.PhaseTimer (records only on log steps)
    log: bool
    evaluating: bool
    record: dict = field(default_factory=dict)
    stop: bool = False

    @property
    def done(self) -> int:
        return self.step + 1


class SkipCounter:
    """Skipped updates (non-finite or absurd; decided on device) counted without a host round-trip
    per step: flags are read at log steps and before every checkpoint."""

    def __init__(self, max_skipped: int):
        self.max_skipped = max_skipped
        self.unread = []  # (step, loss, skipped flag) on device
        self.in_a_row = 0

    def after_step(self, ctx: StepContext):
        self.unread.append((ctx.done, ctx.metrics["loss"], ctx.metrics["skipped"], ctx.metrics["update_ratio"]))
        if ctx.log:
            ctx.record["skipped_steps"] = float(self.flush())

    def flush(self) -> int:
        """Read the flags since the last read (one round-trip for all); raise after max_skipped in a
        row. -> skipped steps read."""
        flags = [(s, float(loss), float(skip), float(ratio)) for s, loss, skip, ratio in self.unread]
        self.unread = []
        for s, loss, skip, ratio in flags:
            self.in_a_row = self.in_a_row + 1 if skip else 0
            if self.in_a_row >= self.max_skipped:
                why = (f"loss is {loss}" if not np.isfinite(loss) else
                       f"the update multiplied the parameters' norm by {ratio:.3g}" if np.isfinite(ratio) else
                       "the gradient or the update is not finite")
                raise OpdError(f"{why} at step {s} ({self.in_a_row} skipped step(s) in a row, "
                               f"train.max_skipped={self.max_skipped}); stopped, and no such update was applied "
                               "(the last checkpoint is intact): lower optim.lr or check the teachers' outputs")
        return int(sum(f[2] for f in flags))


class Logger:
    """Log steps: one metrics.jsonl record; eval steps add greedy accuracy and write samples.jsonl.
    Without a writer (or samples writer) the records are only kept (`last`)."""

    def __init__(self, run, writer=None, samples=None):
        self.run, self.writer, self.samples = run, writer, samples
        self.last: dict = {}  # the last record written

    def after_step(self, ctx: StepContext):
        if not ctx.log:
            return
        run, rec = self.run, ctx.record
        rec["loss"] = float(ctx.metrics["loss"])
        rec.update(ctx.timer.record())
        arrays = ctx.batch.arrays
        for k, v in ctx.metrics.items():
            v = np.asarray(v)
            if k == "on_policy/row_divergence":
                for name, sls in run.rows.slices(v.shape[0]).items():
                    if name:
                        rec[f"teacher/{name}/divergence"] = float(np.mean(np.concatenate([v[s] for s in sls])))
            elif v.ndim == 0 and k != "skipped":
                rec[k] = float(v)
        rec["tokens_per_s"] = rec.get("on_policy/tokens", 0.0) / rec["time/step"] if "on" in arrays else 0.0
        if ctx.batch.rewards is not None:
            rec["reward"] = float(np.mean(ctx.batch.rewards))
        if ctx.batch.engine is not None:  # the share of decode slot-steps that produced a token
            rec["rollout/occupancy"] = ctx.batch.engine.occupancy
            rec["rollout/decode_steps"] = ctx.batch.engine.decode_steps
        for t in run.teachers.values():  # e.g. served teachers: what crossed the wire per scored token
            rec.update(t.metrics())
        for name, part in arrays.items():
            if part.packed:  # the rollouts logged stop rate, horizon and real-token fraction before packing
                continue
            if name == "on":
                rec.update(stop_metrics(part.tokens, part.mask, run.rollouts.stop))
                rec["rollout/horizon"] = int(part.mask.shape[1])  # new tokens sampled (data.horizon)
            real = float(np.sum(dist.to_host(part.prompt_mask)) + np.sum(dist.to_host(part.mask)))
            rec["update/real_token_fraction" + ("" if name == "on" else "_off")] = real / float(np.prod(part.tokens.shape))
        rec.update(ctx.batch.metrics)  # asynchronous runs: staleness histogram, drops, waits, weight sync
        if ctx.evaluating:
            acc, texts, rewards = run.rollouts.evaluate(ctx.state.params, run.eval_examples)
            rec.update({f"eval/{d}/accuracy": v for d, v in acc.items()})
            # what the student wrote this step (with the teachers' divergence), else its greedy eval answers
            if self.samples is not None and "on" in arrays:
                self.samples.write(ctx.done, sample_rows(run.prompter, "on_policy", ctx.batch.examples, ctx.batch.texts,
                                                         ctx.batch.rewards, ctx.metrics["on_policy/row_divergence"]))
            elif self.samples is not None:
                self.samples.write(ctx.done, sample_rows(run.prompter, "greedy_eval", run.eval_examples, texts, rewards))
        if self.writer is not None:
            self.writer.write(ctx.done, rec)
        self.last = rec

    def close(self):
        if self.writer is not None:
            self.writer.close()


def stop_metrics(tokens, mask, stop) -> dict:
    """rollout/eos_rate: the share of completions whose last token is a stop id (they ended by
    themselves, not at the length cap); rollout/mean_length: mean completion tokens. tokens [B, P+N],
    mask [B, N] (host or device)."""
    from opd_jax.distributed import to_host

    mask = to_host(mask)
    comp = to_host(tokens)[:, -mask.shape[1]:]
    length = mask.sum(1)
    last = comp[np.arange(len(length)), np.maximum(length - 1, 0)]
    ended = (length > 0) & np.isin(last, np.asarray(stop or (-1,)))
    return {"rollout/eos_rate": float(ended.mean()), "rollout/mean_length": float(length.mean())}


class StopRateGuard:
    """train.min_eos_rate: warns the first time rollout/eos_rate (log steps) falls below the threshold,
    and stops the run with a one-line error once it has stayed below for `patience` log steps in a row
    (checkpoints already written stay; the last one resumes). Runs after the Logger."""

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience, self.below, self.warned = threshold, patience, 0, False

    def after_step(self, ctx: StepContext):
        rate = ctx.record.get("rollout/eos_rate")
        if rate is None:
            return
        if rate >= self.threshold:
            self.below = 0
            return
        self.below += 1
        if not self.warned:
            self.warned = True
            print(f"opd-jax: warning: at step {ctx.done} only {rate:.2f} of completions end with a stop id "
                  f"(train.min_eos_rate {self.threshold}); the student may be losing the ability to stop", flush=True)
        if self.below >= self.patience:
            raise OpdError(f"at step {ctx.done} rollout/eos_rate {rate:.2f} has been below train.min_eos_rate "
                           f"{self.threshold} for {self.below} log steps (mean completion length "
                           f"{ctx.record.get('rollout/mean_length', float('nan')):.1f}): the student has stopped "
                           "ending its answers; stopped, the last checkpoint is intact (lower optim.lr, or check "
                           "the stop ids)")


def sample_rows(prompter, source, examples, texts, rewards, divergence=None) -> list[dict]:
    """samples.jsonl lines: the rendered prompt exactly as tokenized, the completion, its reward and
    the mean per-token teacher divergence of the sample (None where no teacher scored it)."""
    div = [None] * len(texts) if divergence is None else [float(d) for d in np.asarray(divergence)]
    return [{"source": source, "domain": ex.domain, "prompt": prompter.text(ex), "completion": t,
             "answer": ex.answer, "reward": float(r), "divergence": d}
            for ex, t, r, d in zip(examples, texts, rewards, div)]


class Progress:
    """A tqdm bar (process 0), with loss, divergence, tokens/s, reward and accuracy at log steps."""

    def __init__(self, total: int, initial: int):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, initial=initial, desc="opd", dynamic_ncols=True)

    def after_step(self, ctx: StepContext):
        self.bar.update(1)
        rec = ctx.record
        if "loss" not in rec:
            return
        div = next((v for k, v in rec.items() if k.endswith("policy/divergence")), float("nan"))
        post = {"loss": f"{rec['loss']:.4f}", "div": f"{div:.4f}", "tok/s": f"{rec.get('tokens_per_s', 0):.0f}"}
        if "reward" in rec:
            post["reward"] = f"{rec['reward']:.2f}"
        if "eval/mean/accuracy" in rec:
            post["acc"] = f"{rec['eval/mean/accuracy']:.2f}"
        self.bar.set_postfix(post)

    def close(self):
        self.bar.close()


class HorizonTrace:
    """data.horizon_schedule=progressive: feeds each step's teacher divergence to the schedule
    (`horizon.ProgressiveHorizon`), whose state is the TrainState's `horizon` (so a checkpoint resumes
    it), and appends {"step", "h", "divergence"} to horizon.jsonl, a trace for the reader (lines after
    a resume step are dropped)."""

    def __init__(self, ctl, sharding, out, resume_step: int | None):
        from pathlib import Path

        from opd_jax.metrics import _reset_jsonl

        self.ctl, self.sharding, self.path = ctl, sharding, Path(out) / "horizon.jsonl"
        if dist.is_main():
            _reset_jsonl(self.path, resume_step)

    def after_step(self, ctx: StepContext):
        import json

        on = ctx.batch.arrays["on"]
        h = int(ctx.batch.metrics["rollout/horizon"] if on.packed else on.mask.shape[1])
        d = float(ctx.metrics["on_policy/divergence"])  # one host read per step: the next step's length needs it
        if dist.is_main():
            with self.path.open("a") as f:
                f.write(json.dumps({"step": ctx.done, "h": h, "divergence": d}) + "\n")
        new = self.ctl.observe(dist.to_host(ctx.state.horizon), d)
        ctx.state = ctx.state._replace(horizon=dist.put_global(new, self.sharding))


class Checkpoints:
    """Saves the TrainState (the checkpoint is exactly the state) every `every` steps, at the last
    step and when `preemption` reports SIGTERM (then stops the run: the process exits 0 and
    --resume continues bit-exactly). Skip flags are read first: a run that should have stopped is
    never saved."""

    def __init__(self, mgr, every: int, last: int, preemption, skips: SkipCounter):
        self.mgr, self.every, self.last, self.preemption, self.skips = mgr, every, last, preemption, skips

    def after_step(self, ctx: StepContext):
        stop = self.preemption.reached(ctx.done)
        if ctx.done % self.every == 0 or ctx.done == self.last or stop:
            self.skips.flush()
            ckpt.save(self.mgr, ctx.done, ctx.state)
        if stop:
            print(f"opd-jax: preempted (SIGTERM): saved step {ctx.done}; continue with --resume", flush=True)
            ctx.stop = True

    def abandoned(self, done: int, state):
        """SIGTERM abandoned step done + 1 (a served call): save the state after `done` steps unless it
        is already saved (or is the run's start), then the run stops."""
        saved = self.mgr.latest_step()
        if done > 0 and saved != done:
            self.skips.flush()
            ckpt.save(self.mgr, done, state)
            saved = done
        print(f"opd-jax: preempted (SIGTERM) during step {done + 1}, which was abandoned; "
              + (f"the checkpoint at step {saved} stands; continue with --resume" if saved is not None
                 else "no step had finished, so no checkpoint was written"), flush=True)
