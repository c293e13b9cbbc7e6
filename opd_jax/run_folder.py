"""The run folder (`train.out_dir`): one writer at a time, a config that resume keeps, logs that
survive a crash mid-line.

    out_dir/
      .lock            {"host", "pid", "started"} of the process writing the folder
      config.yaml      the config the run started with (resume checks against it, never rewrites it)
      checkpoints/     Orbax TrainState checkpoints (opd_jax.checkpoint)
      metrics.jsonl, samples.jsonl, tb/, plots/, tokenizer/ (the built-in tokenizer, when used)

Only process 0 takes the lock and writes these files; every process writes its checkpoint shards.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

import yaml

from opd_jax.errors import OpdError

# keys a resumed run may change: how long it runs and how often it logs, evaluates and saves
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.out_dir", "train.progress", "distributed.coordinator",
                     "distributed.num_processes", "distributed.process_id", "data.rollout_slots",
                     "data.decode_steps_per_call", "mesh.rollout_rules")  # the last three never change a sampled token


def check_writable(out: Path, inputs=()):
    """A one-line error, before anything is written, when `out` cannot become a writable folder or is
    one of the run's input folders (`inputs`: model and tokenizer paths)."""
    out = Path(out)
    for p in inputs:
        if p and Path(p).resolve() == out.resolve():
            raise OpdError(f"train.out_dir {out} is one of the run's inputs ({p}); write the run to a folder of its own")
    if out.exists() and not out.is_dir():
        raise OpdError(f"train.out_dir {out} is a file, not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OpdError(f"train.out_dir {out} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OpdError(f"train.out_dir {out} cannot be written: no write permission on {parent}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`out_dir/.lock`, created atomically (O_EXCL) and removed on release. A second run into the
    folder is refused in one line naming the holder; a lock whose process is gone (same host) is
    taken over with a warning."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / ".lock"
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                    warnings.warn(f"{self.path}: taking over a stale lock (process {holder['pid']} on "
                                  f"{holder['host']}, started {holder.get('started')}, is gone)", stacklevel=2)
                    self.path.unlink(missing_ok=True)
                    continue
                if not holder:  # unreadable (being written this instant, or damaged)
                    raise OpdError(f"{self.path.parent} is locked by another run ({self.path} exists); wait for it "
                                   "to finish, or delete the lock file if no run is using the folder")
                raise OpdError(f"{self.path.parent} is in use by another run (process {holder.get('pid')} on "
                               f"{holder.get('host')}, started {holder.get('started')}); wait for it to finish or "
                               "set train.out_dir to another folder")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise OpdError(f"could not take the lock {self.path}")

    def _holder(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def repair_jsonl(path: Path) -> int:
    """Drop a cut-off last line (what a crash mid-write leaves) from a JSONL file, with a warning.
    Lines before it that do not parse are an error naming the line. -> lines dropped."""
    if not path.exists():
        return 0
    text = path.read_text()
    lines = text.splitlines()
    bad = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            json.loads(ln)
        except ValueError:
            bad.append(i)
    if not bad:
        return 0
    if bad != [len(lines) - 1]:
        raise OpdError(f"{path} line {bad[0] + 1} is not valid JSON (and not the last line, so not a crash "
                       "mid-write); fix or remove it")
    warnings.warn(f"{path}: dropped a cut-off last line (a crash mid-write): {lines[-1][:60]!r}", stacklevel=2)
    path.write_text("".join(ln + "\n" for ln in lines[:-1]))
    return 1


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("routing", "init", "verifiers", "chat_template_kwargs"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(saved: dict, now: dict) -> list[str]:
    """Dotted config keys whose values differ between two config trees (as `to_dict` writes them)."""
    a, b = _flatten(saved), _flatten(now)
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - YAML reads tuples back as lists
    return sorted(k for k in set(a) | set(b) if norm(a.get(k)) != norm(b.get(k)))


def check_resume_config(out: Path, now: dict):
    """Refuse, in one line naming the keys, a resume whose config differs from the run's
    config.yaml in anything but `RESUMABLE_CHANGES` (a changed train.steps under a decaying schedule
    warns)."""
    path = Path(out) / "config.yaml"
    if not path.exists():
        raise OpdError(f"--resume given but {path} is missing: this folder was not written by opd-jax train")
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise OpdError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); it records the run's config") from None
    diff = changed_keys(saved, now)
    changed = [k for k in diff if k not in RESUMABLE_CHANGES]
    if changed:
        before, after = _flatten(saved), _flatten(now)
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in changed[:6])
        raise OpdError(f"cannot resume {out} with a changed config: {shown}"
                       f"{' and more' if len(changed) > 6 else ''}; only {', '.join(RESUMABLE_CHANGES[:6])} may "
                       "change on resume (start a new train.out_dir to change the rest)")
    if "train.steps" in diff and now["optim"]["schedule"] != "constant":
        warnings.warn(f"train.steps changed on resume ({saved['train']['steps']} -> {now['train']['steps']}): the "
                      f"{now['optim']['schedule']} learning-rate schedule now spans the new length, so the run will "
                      "not match one started with either length", stacklevel=2)


def input_paths(cfg) -> list[str]:
    """The folders and files a run reads (student, tokenizer, prompts, teachers): never a place to write."""
    return [p for p in [cfg.student.path, cfg.data.tokenizer, cfg.data.path] +
            [t.path for t in cfg.teachers if not t.is_student] if p]


def write_config(out: Path, tree: dict):
    """config.yaml of a new run (a resumed run keeps the one it started with)."""
    (Path(out) / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
