"""A run's checkpoint out of the run folder: its parameters, or the student as a Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax import checkpoint as ckpt
from opd_jax.errors import OpdError


def _run_config(run_dir: Path):
    from opd_jax.config import load_config

    if not run_dir.exists():
        raise OpdError(f"run folder {run_dir} does not exist")
    if not (run_dir / "config.yaml").exists():
        raise OpdError(f"{run_dir} is not a run folder (no config.yaml)")
    return load_config(run_dir / "config.yaml")


def restore_run_params(run_dir: str | Path, step: int | None = None, cfg=None):
    """(model graphdef, pure-dict params, step) of a run's checkpoint (the newest readable one when
    step is None); `cfg`: the run's config when the caller has read it already."""
    from opd_jax.lora import trainable
    from opd_jax.optim import make_optimizer
    from opd_jax.run import build_student
    from opd_jax.train_step import new_state

    run_dir = Path(run_dir)
    cfg = cfg or _run_config(run_dir)
    student = build_student(cfg.student, cfg.train.seed)
    graphdef, state = nnx.split(student)
    params = nnx.to_pure_dict(state)
    if not (run_dir / "checkpoints").is_dir():
        raise OpdError(f"no checkpoint in {run_dir / 'checkpoints'}")
    mgr = ckpt.manager(run_dir / "checkpoints")
    opt = make_optimizer(cfg.optim, cfg.train.steps, trainable(params))
    like = new_state(params, opt.init(trainable(params)), jax.random.key(cfg.train.seed))._asdict()
    restored = ckpt.restore_latest(mgr, like, step=step)
    if restored is None:
        raise OpdError(f"no checkpoint in {run_dir / 'checkpoints'}")
    return graphdef, restored[1]["params"], int(restored[0])


def check_export_target(out: Path, run_dir: Path, cfg, force: bool):
    """One-line refusals: `out` is the run folder, inside its checkpoints, one of the run's inputs
    (even with force), a file, or an existing non-empty folder (unless force)."""
    from opd_jax.run_folder import input_paths

    target, checkpoints = out.resolve(), (run_dir / "checkpoints").resolve()
    own = [run_dir.resolve()] + [Path(x).resolve() for x in input_paths(cfg)]
    hit = next((p for p in own if target == p), checkpoints if target.is_relative_to(checkpoints) else None)
    if hit is not None:
        raise OpdError(f"--out {out} is one of the run's own folders ({hit}); export to a new folder")
    if out.exists() and not out.is_dir():
        raise OpdError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OpdError(f"--out {out} already holds files; pass --force to overwrite them or choose a new folder")


def export_student(run_dir: str | Path, out: str | Path, *, step: int | None = None, force: bool = False,
                   adapters: str | None = None) -> Path:
    """Write a checkpoint's student (the newest readable one, or `step`) as a Hugging Face folder, with
    the run's tokenizer and stop ids. Never overwrites an existing non-empty folder unless `force`,
    and never the run's own folders. A LoRA run (student.lora) needs `adapters`: "lora" writes a PEFT
    adapter folder for its base (`lora.peft_tensors`), "merge" the base with the adapters merged in."""
    from opd_jax.lora import check_lora

    run_dir, out = Path(run_dir), Path(out)
    cfg = _run_config(run_dir)
    adapted = check_lora(cfg.student.lora) is not None
    if adapted and adapters not in ("lora", "merge"):
        raise OpdError(f"{run_dir} trained LoRA adapters (student.lora): pass --lora (a PEFT adapter folder for the "
                       "base) or --merge (the base with the adapters merged in)")
    if adapters and not adapted:
        raise OpdError(f"--{adapters}: {run_dir} has no LoRA adapters (student.lora is not set); export it without it")
    check_export_target(out, run_dir, cfg, force)
    graphdef, params, step = restore_run_params(run_dir, step, cfg)
    path = _write_model(nnx.merge(graphdef, params), params, out, adapters, cfg.student.path or "")
    _write_extras(path, run_dir, cfg, step)
    return path


def _write_model(model, params, out: Path, adapters: str | None, base_path: str) -> Path:
    """The student as a Hugging Face folder; with adapters="lora" a PEFT folder, "merge" merged weights."""
    from safetensors.numpy import save_file

    from opd_jax import lora
    from opd_jax.distributed import to_host
    from opd_jax.models import save_model

    if adapters == "merge":
        merged = lora.merged_params(jax.tree.map(to_host, params), model.cfg)
        return Path(save_model(nnx.merge(lora.base_graphdef(model.cfg), jax.tree.map(jnp.asarray, merged)), out))
    if adapters == "lora":
        out.mkdir(parents=True, exist_ok=True)
        tensors = lora.peft_tensors(jax.tree.map(to_host, params), model.cfg)  # every process gathers
        if jax.process_index():
            return out
        save_file(tensors, out / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(lora.peft_config(model.cfg, base_path), indent=2))
        return out
    return Path(save_model(model, out))


def _write_extras(path: Path, run_dir: Path, cfg, step: int):
    """The run's tokenizer and stop ids beside an exported model, and the step it came from."""
    from opd_jax.tasks import load_tokenizer

    student_dir = Path(cfg.student.path) if cfg.student.path else None
    tok_dir = next((d for d in (run_dir / "tokenizer", cfg.data.tokenizer and Path(cfg.data.tokenizer), student_dir)
                    if d and (Path(d) / "tokenizer.json").exists()), None)
    if tok_dir is not None:  # the tokenizer the run used
        load_tokenizer(tok_dir).save_pretrained(path)
    if student_dir is not None and (student_dir / "generation_config.json").exists():  # its stop ids
        (path / "generation_config.json").write_text((student_dir / "generation_config.json").read_text())
    (path / "opd_jax_step.json").write_text(json.dumps({"step": step}))
    return path


def load_run_model(run_dir: str | Path, step: int | None = None):
    """The student of a run's checkpoint (the newest readable one, or `step`) as an nnx model."""
    graphdef, params, _ = restore_run_params(run_dir, step)
    return nnx.merge(graphdef, params)
