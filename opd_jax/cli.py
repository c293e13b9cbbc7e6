"""The `opd-jax` command line."""

from __future__ import annotations

import argparse
import sys

from opd_jax.errors import OpdError

DEMO_PLAN = """\
opd-jax demo: multi-teacher on-policy distillation on synthetic verifiable tasks, on this CPU.

What it will do (the trainer that runs it is not in this release yet):
  1. build three synthetic tasks (addition, string reversal, sorting) and a tokenizer for them;
  2. train one small teacher per task (cached, so a second run skips this);
  3. make a smaller, weaker student and sample its own answers;
  4. score every token with the teacher of each prompt's domain and move the student toward it;
  5. write summary.json (per-domain accuracy before/after and of each teacher), metrics.jsonl and plots.

Available now: the model, Hugging Face load/save and the sampler (see README.md, "Library").
"""


def _demo(args) -> int:
    print(DEMO_PLAN)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd-jax", description="On-policy distillation in JAX.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="multi-teacher OPD on synthetic tasks, on CPU, no downloads")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--steps", type=int, default=None, help="shorten the run to N OPD steps")
    demo.set_defaults(func=_demo)
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


if __name__ == "__main__":
    sys.exit(main())
