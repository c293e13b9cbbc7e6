"""Print the estimator audit table of docs/math.md (opd_jax/analysis/estimator_audit.py explains every column).

    python scripts/estimator_audit.py [--n 64] [--json docs/estimator_audit.json]
"""

import argparse
import json
from pathlib import Path

from opd_jax.analysis.estimator_audit import N_TOKENS, table


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}g}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64, help="contexts per regime")
    ap.add_argument("--json", default="docs/estimator_audit.json")
    args = ap.parse_args()
    rows = table(args.n)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"| estimator | source | claims | rel. bias f32 (far / near) | cosine, norm ratio f32 far | z f32 far "
          f"(bias / SE, {N_TOKENS} tokens) | rel. bias bf16 far | negative values f32 / bf16 (near, of {args.n}) | "
          f"NaN | zero expected gradient f32 (far / near) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ff, fn, bf, bn = r["f32_far"], r["f32_near"], r["bf16_far"], r["bf16_near"]
        nan = sum(x["nan"] for x in (ff, fn, bf, bn))
        print(f"| {r['name']} | {r['source']} | {r['claims']} | {fmt(ff['relative_bias'])} / "
              f"{fmt(fn['relative_bias'])} | {fmt(ff['cosine'], 2)}, {fmt(ff['norm_ratio'], 2)} | {fmt(ff['z'])} | {fmt(bf['relative_bias'])} | "
              f"{fn['negative']} / {bn['negative']} (min {fmt(min(fn['min_value'], bn['min_value']))}) | {nan} | "
              f"{ff['zero_grad']} / {fn['zero_grad']} |")


if __name__ == "__main__":
    main()
