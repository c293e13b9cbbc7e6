"""On-policy distillation throughput: opd_jax's trainer vs TRL's DistillationTrainer (torch, CPU), one run.

Same tiny Qwen3 student and teacher (random weights, built by transformers, saved as safetensors and
loaded by both), same character tokenizer, same prompts (the demo's three domains), same batch,
generation length, temperature and loss (forward KL over the full vocabulary on the student's own
samples: opd_jax loss.kind=forward_kl, TRL beta=0). Each side runs `--warmup` steps (compilation,
caches) and then `--steps` timed steps; throughput = batch x max_new_tokens (the completion token
slots each step trains on) x steps / seconds.

    pip install -e '.[bench]'   # trl
    python scripts/bench_vs_trl.py [--batch 48 --new 8 --steps 20 --log-every 10]

A real shape: `--model DIR` (student and teacher the same Hugging Face folder) or `--student DIR
--teacher DIR`, e.g. SmolLM2-135M-Instruct and its 24-layer copy (README "A real model"). Then the
prompts are the chat domains capital and sum_digits rendered by the student's chat template (the same
rendered text goes to TRL as a plain prompt), and generation stops at the model's stop ids on both sides:

    python scripts/bench_vs_trl.py --student runs/smollm2-24 --teacher "$M" --batch 8 --new 48 --steps 5 --warmup 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=48, help="prompts per step (16 per domain)")
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pack-tokens", type=int, default=0, help="opd_jax data.pack_tokens (0: padded rows)")
    ap.add_argument("--log-every", type=int, default=10, help="opd_jax train.log_every (log steps wait for each phase)")
    ap.add_argument("--model", default=None, help="a Hugging Face folder used as both student and teacher")
    ap.add_argument("--student", default=None, help="a Hugging Face folder (the student)")
    ap.add_argument("--teacher", default=None, help="a Hugging Face folder (the teacher)")
    args = ap.parse_args()
    if args.model:
        args.student = args.student or args.model
        args.teacher = args.teacher or args.model
    if bool(args.student) != bool(args.teacher):
        ap.error("give both --student and --teacher (or --model)")

    import jax
    import torch
    import transformers
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from opd_jax.config import load_config
    from opd_jax.demo import DOMAINS, STUDENT, TEACHER
    from opd_jax.tasks import PromptSource, build_char_tokenizer
    from opd_jax.hooks import Logger, SkipCounter
    from opd_jax.run import build_run
    from opd_jax.train import train_loop

    work = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    real = bool(args.student)
    torch.manual_seed(0)
    paths = {}
    if real:
        from opd_jax.tasks import Prompter, load_tokenizer, stop_ids

        paths = {"student": Path(args.student), "teacher": Path(args.teacher)}
        tok = load_tokenizer(paths["student"])
        domains = ("capital", "sum_digits")
        stops = stop_ids(tok, paths["student"])
    else:
        tok = build_char_tokenizer(work / "tok")
        domains = DOMAINS
    for name, shape in (() if real else (("student", STUDENT), ("teacher", TEACHER))):
        cfg = transformers.Qwen3Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                                       intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                                       num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                                       head_dim=shape["head_dim"], max_position_embeddings=64, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=0)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        paths[name] = work / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    per_domain = args.batch // len(domains)
    if real:  # the longest prompt, rounded up to 8 (TRL pads each batch to its longest prompt)
        rendered = Prompter(tok, chat_template=True)
        longest = max(len(rendered.ids(e)) for s in range(args.warmup + args.steps)
                      for e in PromptSource(list(domains)).batch(s, per_domain))
        prompt_len = -(-longest // 8) * 8
    total = args.warmup + args.steps

    # ---- opd_jax
    ov = [f"student.path={paths['student']}", f"teachers=[{{name: t, path: {paths['teacher']}}}]",
          f"data.domains=[{', '.join(domains)}]", "routing={" + ", ".join(f"{d}: t" for d in domains) + "}",
          *(["data.chat_template=true", f"data.max_prompt_len={prompt_len}"] if real else [f"data.tokenizer={work / 'tok'}"]),
          f"data.per_domain={per_domain}", "data.group_size=1", f"data.max_new_tokens={args.new}",
          "loss.estimator_type=full", "loss.kind=forward_kl", f"train.steps={total + 1}", "train.progress=false",
          "train.eval_every=100000", "train.checkpoint_every=100000", f"train.out_dir={work / 'opd_run'}",
          "optim.lr=1e-4", "optim.clip_norm=1.0", f"train.log_every={args.log_every}",
          f"data.pack_tokens={args.pack_tokens}"]
    run = build_run(load_config(None, ov))
    logger = Logger(run)
    state = train_loop(run, run.init, [SkipCounter(run.cfg.train.max_skipped)], start=0, end=args.warmup)
    # steady state: steps are dispatched asynchronously and only log steps read back from the device,
    # so the clock stops once the last step's parameters exist; train.steps is one past the last timed
    # step, so the final step's evaluation is not timed
    logged = []

    class Keep:  # every log step's record
        def after_step(self, ctx):
            if ctx.log:
                logged.append(dict(ctx.record))

    t0 = time.perf_counter()
    state = train_loop(run, state, [SkipCounter(run.cfg.train.max_skipped), logger, Keep()], start=args.warmup,
                       end=total)
    jax.block_until_ready(state)
    ours = time.perf_counter() - t0
    if logged:
        phases = {k: round(sum(r[k] for r in logged) / len(logged) * 1e3, 1) for k in logged[0] if k.startswith("time/")}
        print(f"opd_jax phase times on its {len(logged)} log step(s), ms (each phase waited for):", phases)

    # ---- TRL
    src = PromptSource(list(domains), seed=0)
    if real:  # the student's chat template, rendered once: TRL gets the same text opd_jax tokenizes
        prompter = Prompter(tok, chat_template=True)
        prompts = [prompter.text(e) for s in range(total) for e in src.batch(s, per_domain)]
    else:
        prompts = [tok.bos_token + e.prompt for s in range(total) for e in src.batch(s, per_domain)]
    ds = Dataset.from_dict({"prompt": prompts})
    cfg = DistillationConfig(output_dir=str(work / "trl"), per_device_train_batch_size=len(domains) * per_domain,
                             max_steps=total, learning_rate=1e-4, max_grad_norm=1.0, beta=0.0, temperature=1.0,
                             max_completion_length=args.new, logging_steps=1000, save_strategy="no",
                             report_to="none", use_cpu=True, shuffle_dataset=False, dataloader_num_workers=0,
                             bf16=False, disable_dropout=True)
    student = transformers.AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    if real and list(stops) != [tok.eos_token_id]:  # TRL stops at the tokenizer's EOS only
        raise SystemExit(f"the model's stop ids {stops} are not just the tokenizer's EOS: the sides would stop apart")
    times = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    trl = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok,
                              callbacks=[Timer()])
    trl.train()
    theirs = sum(times[args.warmup:])

    tokens = args.batch * args.new * args.steps
    import trl as trl_pkg

    shapes = [(m.config.num_hidden_layers, m.config.hidden_size, m.config.vocab_size) for m in (student, teacher)]
    print(f"trl {trl_pkg.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"jax {jax.__version__}; torch threads {torch.get_num_threads()}, host cores {os.cpu_count()}; "
          f"student (layers, width, vocab) {shapes[0]}, teacher {shapes[1]}, batch {args.batch}, new {args.new}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"opd_jax: {tokens / ours:9.1f} tokens/s ({ours / args.steps * 1e3:.1f} ms/step)")
    print(f"TRL:     {tokens / theirs:9.1f} tokens/s ({theirs / args.steps * 1e3:.1f} ms/step)")
    print(f"ratio opd_jax / TRL: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
