"""The demo's teacher recipe, checked: train each domain's teacher exactly as `opd-jax demo` does
(`opd_jax.demo.train_teacher`, recipe in opd_jax/demo.py) for several seeds and print its greedy
accuracy on the demo's 128 held-out prompts per domain, one JSON line per (domain, seed). Run it once
as is (one CPU device, as the demo runs) and once with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the tests' 8 fake devices):

    python scripts/experiments/demo_teacher.py --seeds 0 1
    # a recipe other than the demo's, for one domain:
    python scripts/experiments/demo_teacher.py --domains addition --steps 600 --batch 32 --warmup 20
"""

import argparse
import json
import tempfile
import time

import jax

from opd_jax import demo
from opd_jax.evaluate import greedy_accuracy
from opd_jax.tasks import build_char_tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", nargs="*", default=list(demo.DOMAINS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=0, help="override the recipe's steps (every domain)")
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=-1)
    a = ap.parse_args()
    if a.steps:
        demo.TEACHER_SFT = {d: a.steps for d in demo.DOMAINS}
    demo.TEACHER_LR = a.lr or demo.TEACHER_LR
    demo.TEACHER_BATCH = a.batch or demo.TEACHER_BATCH
    demo.TEACHER_WARMUP = demo.TEACHER_WARMUP if a.warmup < 0 else a.warmup
    tok = build_char_tokenizer(tempfile.mkdtemp())
    for d in a.domains:
        ev = [e for e in demo.eval_examples() if e.domain == d]
        for seed in a.seeds:
            t0 = time.time()
            model = demo.train_teacher(d, tok, seed=seed, progress=False)
            acc = greedy_accuracy(model, tok, ev, max_prompt_len=demo.MAX_PROMPT, max_new_tokens=demo.MAX_NEW)[d]
            print(json.dumps({"domain": d, "seed": seed, "devices": jax.device_count(), "steps": demo.TEACHER_SFT[d],
                              "batch": demo.TEACHER_BATCH, "lr": demo.TEACHER_LR, "warmup": demo.TEACHER_WARMUP,
                              "acc": round(acc, 4), "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
