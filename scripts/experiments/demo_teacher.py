"""Demo teacher recipes: train one domain's teacher with a recipe and print its greedy accuracy on the
demo's 128 held-out prompts (the same evaluation as `opd-jax demo`). Used to pick the recipe in
opd_jax/demo.py; run with XLA_FLAGS=--xla_force_host_platform_device_count=8 for the 8-device check.

    python scripts/experiments/demo_teacher.py --domain addition --steps 1500 --lr 3e-3 --batch 64 --seed 0
"""

import argparse
import json
import tempfile
import time

import jax

from opd_jax import demo
from opd_jax.evaluate import greedy_accuracy
from opd_jax.models import ModelConfig, init_model
from opd_jax.sft import sft_train
from opd_jax.tasks import PromptSource, build_char_tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="addition")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tok = build_char_tokenizer(tempfile.mkdtemp())
    t0 = time.time()
    model = init_model(ModelConfig.for_family("qwen3", **demo.TEACHER), seed=demo.DOMAINS.index(a.domain) + 100 * a.seed)
    src = PromptSource([a.domain], seed=1000 + a.seed)
    losses = sft_train(model, tok, lambda s: [(e.prompt, e.answer) for e in src.batch(s, a.batch)], steps=a.steps,
                       lr=a.lr, warmup=a.warmup, max_prompt_len=demo.MAX_PROMPT, max_new_tokens=demo.MAX_NEW)
    ev = PromptSource(list(demo.DOMAINS), seed=0).batch(0, 128, stream=1)
    ev = [e for e in ev if e.domain == a.domain]
    acc = greedy_accuracy(model, tok, ev, max_prompt_len=demo.MAX_PROMPT, max_new_tokens=demo.MAX_NEW)[a.domain]
    print(json.dumps({**vars(a), "devices": jax.device_count(), "acc": round(acc, 4), "final_loss": round(losses[-1], 4),
                      "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
