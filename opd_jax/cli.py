"""The `opd-jax` command line: demo, train, eval, export, analyze, plan, serve-teacher, convert-gguf,
prune-layers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from opd_jax.errors import OpdError


def _at_least(args, minimum: int, *names: str):
    """One-line refusal of an integer flag below `minimum` (before anything is read or written)."""
    for name in names:
        v = getattr(args, name)
        if v is not None and v < minimum:
            raise OpdError(f"--{name.replace('_', '-')} must be >= {minimum}, got {v}")


def _demo(args) -> int:
    from opd_jax.demo import run_demo

    _at_least(args, 1, "steps")
    run_demo(args.out, steps=args.steps)
    return 0


def _train(args) -> int:
    from opd_jax.config import load_config
    from opd_jax.train import train

    dist = [f"distributed.{k}={v}" for k, v in (("coordinator", args.coordinator), ("num_processes", args.num_processes),
                                                 ("process_id", args.process_id)) if v is not None]
    cfg = load_config(args.config, list(args.overrides) + dist)
    _at_least(args, 0, "resume_step")
    last = train(cfg, resume=args.resume or args.resume_step is not None, resume_step=args.resume_step)
    print(json.dumps({k: v for k, v in last.items() if k.startswith("eval/") or k in ("loss", "reward")}, indent=2))
    return 0


def _eval(args) -> int:
    from opd_jax.config import load_config
    from opd_jax.evaluate import greedy_accuracy, pass_at_k
    from opd_jax.models import load_model
    from opd_jax.tasks import Prompter, PromptSource, load_records, load_tokenizer, stop_ids, verifiers_for

    from pathlib import Path

    _at_least(args, 1, "samples", "per_domain", "max_prompt_len", "max_new_tokens")
    if args.temperature < 0:
        raise OpdError(f"--temperature must be >= 0, got {args.temperature}")
    model_dir = Path(args.model)
    if not model_dir.exists():
        raise OpdError(f"--model {model_dir} does not exist")
    if (model_dir / "config.yaml").exists() and (model_dir / "checkpoints").exists():
        raise OpdError(f"--model {model_dir} is a run folder, not a model folder; write its student first with "
                       f"opd-jax export --run {model_dir} --out FOLDER")
    if not model_dir.is_dir() or not (model_dir / "config.json").exists():
        raise OpdError(f"--model {model_dir} is not a Hugging Face model folder (no config.json)")
    dc = load_config(args.config).data  # rendering, verifiers and lengths (defaults without --config)
    max_prompt = args.max_prompt_len or dc.max_prompt_len
    max_new = args.max_new_tokens or dc.max_new_tokens
    tok = load_tokenizer(args.tokenizer or dc.tokenizer or args.model)
    if args.data:
        examples = load_records(args.data)  # every record once
    else:
        domains = args.domains.split(",") if args.domains else list(dc.domains)
        examples = PromptSource(domains, seed=args.seed).batch(0, args.per_domain, stream=1)
    prompter = Prompter(tok, dc.chat_template, dc.chat_template_kwargs)
    prompter.encode(examples, max_prompt)  # rendering and length errors before the model is read
    verifiers = verifiers_for({d: v for d, v in dc.verifiers.items() if d in {e.domain for e in examples}},
                              sorted({e.domain for e in examples}))
    model = load_model(args.model)
    kw = dict(max_prompt_len=max_prompt, max_new_tokens=max_new, stop=stop_ids(tok, args.model), verifiers=verifiers)
    out = {"greedy_accuracy": greedy_accuracy(model, tok, examples, prompter=prompter, **kw)}
    if args.samples > 1:
        out[f"pass@{args.samples}"] = pass_at_k(model, prompter, examples, args.samples, temperature=args.temperature,
                                                seed=args.seed, **kw)
    print(json.dumps(out, indent=2))
    return 0


def _export(args) -> int:
    from opd_jax.export import export_student

    _at_least(args, 0, "step")
    if args.lora and args.merge:
        raise OpdError("export: give --lora or --merge, not both")
    path = export_student(args.run, args.out, step=args.step, force=args.force,
                          adapters="lora" if args.lora else "merge" if args.merge else None)
    print(f"wrote {path}")
    return 0


def _analyze(args) -> int:
    from opd_jax.analysis.report import analyze

    _at_least(args, 1, "k")
    rep = analyze(args.before, args.after, args.out, series=args.series, k=args.k)
    print(json.dumps({"sparsity": rep["sparsity"], "sparsity_bfloat16": rep["sparsity_bfloat16"],
                      "relative_movement_by_module": rep["relative_movement_by_module"],
                      "near_zero_preference_mean": rep["near_zero_preference_mean"]}, indent=2))
    print(f"wrote {args.out}/analysis.json and plots")
    return 0


def _plan(args) -> int:
    import os

    _at_least(args, 1, "devices")
    if not args.config and not args.overrides:
        raise OpdError("opd-jax plan needs --config (the YAML of the run to plan) or key.sub=value overrides "
                       "describing it")
    if args.devices and "device_count" not in os.environ.get("XLA_FLAGS", ""):
        # fake CPU devices for the target mesh; read when the backend starts (no device was touched yet)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from opd_jax.config import load_config
    from opd_jax.plan import GiB, device_memory_bytes, fit_micro_batch, format_plan, plan

    cfg = load_config(args.config, args.overrides)
    if cfg.train.micro_batch == "auto":  # compiles the step for each candidate, largest first
        micro, p = fit_micro_batch(cfg, args.devices)
        print(f"train.micro_batch=auto -> {micro or 'all'} rows per micro-batch")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch=micro))
    lengths = None
    if args.pack_lengths:
        try:
            lengths = tuple(float(x) for x in args.pack_lengths.split(","))
            assert len(lengths) == 2 and 0 < lengths[0] <= lengths[1]
        except (ValueError, AssertionError):
            raise OpdError(f"--pack-lengths takes MEDIAN,P99 (numbers, median <= p99), got {args.pack_lengths!r}")
    p = plan(cfg, n_devices=args.devices, compile=args.compile or bool(lengths), flops=args.flops,
             roofline=args.roofline, pack_lengths=lengths)
    print(format_plan(p))
    limit = device_memory_bytes(cfg)
    if limit is not None:
        verdict = "fits" if p.total_bytes_per_device <= limit else "does NOT fit"
        print(f"  device memory        {limit / GiB:9.3f} GiB -> {verdict}")
    if args.json:
        print(json.dumps(p.as_dict(), indent=2))
    return 0


def _convert_gguf(args) -> int:
    from opd_jax.gguf import convert_gguf

    out = convert_gguf(args.file, args.out, dtype=args.dtype, force=args.force)
    print(f"opd-jax: wrote {out} (config.json, model.safetensors, tokenizer, generation_config.json)")
    return 0


def _prune_layers(args) -> int:
    from opd_jax.prune import prune_layers

    try:
        drop = None if args.drop is None else [int(x) for x in args.drop.split(",") if x.strip()]
    except ValueError:
        raise OpdError(f"--drop takes comma-separated layer numbers, got {args.drop!r}") from None
    if args.keep is None and drop is None:
        raise OpdError("prune-layers needs --keep N (search) or --drop I,J,... (a recorded choice)")
    rec = prune_layers(args.model, args.keep, args.out, drop=drop, force=args.force)
    print(f"opd-jax: wrote {args.out}: kept {len(rec['kept'])} of {rec['layers']} layers (dropped "
          f"{', '.join(map(str, sorted(rec['dropped'])))}); KL to the full model {rec['kl']:.3f} nats/token, "
          f"top-1 agreement {rec['top1_agreement']:.2f} on held-out text")
    return 0


def _serve_teacher(args) -> int:
    import signal
    import threading

    from opd_jax.models import load_model
    from opd_jax.run import check_model_folder
    from opd_jax.teacher_server import serve

    if not 0 <= args.port <= 65535:
        raise OpdError(f"--port must be in [0, 65535] (0 = any free port), got {args.port}")
    check_model_folder(args.model, "--model")
    model = load_model(args.model, dtype=args.dtype)
    tokenizer = None
    if (Path(args.model) / "tokenizer.json").exists():
        from opd_jax.tasks import load_tokenizer
        tokenizer = load_tokenizer(args.model)
    try:
        server = serve(model, args.port, args.host, args.name, tokenizer)
    except (OSError, OverflowError) as e:
        raise OpdError(f"cannot listen on {args.host}:{args.port}: {getattr(e, 'strerror', None) or e}") from None
    print(f"opd-jax: serving {args.model} as {args.name!r} on http://{args.host}:{server.server_address[1]} "
          "(POST /v1/completions with prompt_logprobs; Ctrl-C stops)", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd-jax", description="On-policy distillation in JAX.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    demo = sub.add_parser("demo", help="multi-teacher OPD on synthetic tasks, on CPU, no downloads")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--steps", type=int, default=None, help="number of OPD steps (default 800)")
    demo.set_defaults(func=_demo)

    tr = sub.add_parser("train", help="train from a YAML config, with key.sub=value overrides")
    tr.add_argument("--config", default=None, help="YAML file (configs/*.yaml); defaults apply without one")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir "
                    "that can be restored")
    tr.add_argument("--resume-step", type=int, default=None, help="continue from this step's checkpoint")
    tr.add_argument("--coordinator", default=None, help="multi-host off TPU: host:port of process 0")
    tr.add_argument("--num-processes", type=int, default=None, help="multi-host off TPU: number of processes")
    tr.add_argument("--process-id", type=int, default=None, help="multi-host off TPU: this process's index")
    tr.add_argument("overrides", nargs="*", help="key.sub=value, e.g. optim.lr=3e-4 train.steps=100")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="greedy accuracy (and pass@k) of a Hugging Face folder per domain, by its verifiers")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", default=None, help="prompt records (.jsonl / .json / .parquet / datasets folder), each once")
    ev.add_argument("--config", default=None, help="a training YAML: its data section's chat template, verifiers, lengths")
    ev.add_argument("--samples", type=int, default=1, help="K > 1: also pass@K from K samples per prompt")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pass@K")
    ev.add_argument("--tokenizer", default=None, help="tokenizer folder (default: data.tokenizer, else the model folder)")
    ev.add_argument("--domains", default=None, help="built-in domains when there is no --data (default: the config's)")
    ev.add_argument("--per-domain", type=int, default=128, help="prompts per built-in domain")
    ev.add_argument("--max-prompt-len", type=int, default=None, help="default: the config's data.max_prompt_len")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's data.max_new_tokens")
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=_eval)

    ex = sub.add_parser("export", help="write a run's newest student checkpoint as a Hugging Face folder")
    ex.add_argument("--run", required=True, help="the run folder (train.out_dir)")
    ex.add_argument("--out", required=True, help="a new (or empty) folder")
    ex.add_argument("--step", type=int, default=None, help="this step's checkpoint (default: the newest)")
    ex.add_argument("--force", action="store_true", help="overwrite a non-empty --out (never the run's own folders)")
    ex.add_argument("--lora", action="store_true", help="a LoRA run (student.lora): its adapters as a PEFT folder "
                    "(adapter_config.json + adapter_model.safetensors) for the base model")
    ex.add_argument("--merge", action="store_true", help="a LoRA run: the base with the adapters merged in, as a "
                    "Hugging Face folder")
    ex.set_defaults(func=_export)

    an = sub.add_parser("analyze", help="where an update moved the weights: sparsity, modules, spectra, subspaces")
    an.add_argument("--before", required=True, help="HF folder, run folder or run/checkpoints/<step>")
    an.add_argument("--after", required=True, help="HF folder, run folder or run/checkpoints/<step>")
    an.add_argument("--series", default=None, help="a run folder: alignment of every checkpoint with the final update")
    an.add_argument("--out", default="analysis", help="output folder (analysis.json, PNG plots)")
    an.add_argument("--k", type=int, default=8, help="top-k for energy and subspace overlap")
    an.set_defaults(func=_analyze)
    pl = sub.add_parser("plan", help="per-device memory and FLOPs of a config on its mesh, from shapes only")
    pl.add_argument("--config", default=None, help="YAML file")
    pl.add_argument("--devices", type=int, default=None, help="plan for this many devices (faked on CPU)")
    pl.add_argument("--compile", action="store_true", help="also compile the train step (as the trainer runs it): activations")
    pl.add_argument("--flops", action="store_true", help="also compile it with the layer loop unrolled: FLOPs per step")
    pl.add_argument("--roofline", default=None, metavar="CHIP", help="also estimate the step's time on a TPU chip "
                    "(v5e, v5p, v6e) from the compiled programs' FLOPs, HBM and collective bytes")
    pl.add_argument("--pack-lengths", default=None, metavar="MEDIAN,P99",
                    help="with data.pack_tokens: compile the update for the packed rows of a step whose completion "
                    "lengths are log-normal with this median and 99th percentile")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON too")
    pl.add_argument("overrides", nargs="*", help="key.sub=value, e.g. mesh.fsdp=8 student.dtype=bfloat16")
    pl.set_defaults(func=_plan)

    cg = sub.add_parser("convert-gguf", help="a GGUF file to a Hugging Face folder (needs the gguf extra)")
    cg.add_argument("file", help="the .gguf file")
    cg.add_argument("--out", required=True, help="a new folder")
    cg.add_argument("--dtype", default="float32", help="float32 or bfloat16 (the safetensors' dtype)")
    cg.add_argument("--force", action="store_true", help="replace --out if it exists")
    cg.set_defaults(func=_convert_gguf)

    pr = sub.add_parser("prune-layers", help="a depth-pruned student: drop the layers the full model misses least")
    pr.add_argument("--model", required=True, help="Hugging Face folder of the full model")
    pr.add_argument("--keep", type=int, help="layers to keep (greedy search)")
    pr.add_argument("--drop", help="comma-separated layers to remove instead of searching (e.g. a pruning.json's choice)")
    pr.add_argument("--out", required=True, help="a new folder")
    pr.add_argument("--force", action="store_true", help="replace --out if it exists")
    pr.set_defaults(func=_prune_layers)

    st = sub.add_parser("serve-teacher", help="serve a teacher folder over HTTP (OpenAI completions + prompt_logprobs)")
    st.add_argument("--model", required=True, help="Hugging Face folder (config.json + safetensors)")
    st.add_argument("--port", type=int, default=8000)
    st.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    st.add_argument("--name", default="teacher", help="the model name the server answers to")
    st.add_argument("--dtype", default="float32")
    st.set_defaults(func=_serve_teacher)

    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from opd_jax import __version__
        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except OpdError as e:
        print(f"opd-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opd-jax: interrupted; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
