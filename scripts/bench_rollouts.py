"""Rollout throughput on a long-tailed length mix: a static batch (one slot per row, every row waits
for the longest) against the rollout engine (fewer slots, refilled as sequences end), same model, same
sequences, same run; and the decode step's collective bytes at Qwen3-1.7B scale.

Lengths: each sequence ends at a length drawn from a seeded log-normal with the given median and 99th
percentile, capped at --cap. The end is forced through the engine's per-sequence length cap, the path a
stop token takes (the slot is handed back at that step); both sides run the same sequences and make
the same tokens (per-sequence keys). Occupancy = generated tokens / (slots x decode steps). tokens/s =
generated tokens / wall seconds of the whole rollout (prefill, inserts, decode, hand-back), after
one warm-up run of each side (compiles).

Collectives: the decode program (one step per call) compiled for a Qwen3-1.7B-shaped student (28
layers, bfloat16) on 16 fake devices with the full recipe's mesh (fsdp 16) and 256 rows, in the
training layout (mesh.rules default) and in the rollout layout; bytes per decode step per chip over
the student's weight bytes (`opd_jax.roofline.collective_bytes`). Run in a subprocess (it needs 16
fake devices; the timing runs on one).

    python scripts/bench_rollouts.py --median 50 --p99 500 --cap 800 --rows 64 --slots 16 --group 4

A real model instead of the random one (e.g. SmolLM2-135M-Instruct from scripts/get_smollm2.sh; prompts
are random ids of its vocabulary; --layers/--width/--vocab are ignored):

    python scripts/bench_rollouts.py --model DIR --rows 32 --slots 8 --median 30 --p99 200 --cap 256 --batches 0 --no-collectives

Ends with two lines for scripts:
    occupancy: static 0.17, engine 0.93
    tokens/s: static 1234.5, engine 2890.1, ratio 2.34x
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

COLLECTIVES = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
from opd_jax.config import load_config
from opd_jax.models.released import qwen3_config
from opd_jax.plan import abstract_params, target_mesh
from opd_jax.rollout_plan import compile_rollout
import math
scfg = qwen3_config("Qwen3-1.7B")
weights = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract_params(scfg)[0]))
out = {"weights": weights}
for rules in ("default", "rollout"):
    cfg = load_config(None, ["mesh.fsdp=16", "mesh.rollout_rules=" + rules, "data.max_prompt_len=512",
                             "data.max_new_tokens=" + sys.argv[1], "data.rollout_slots=256"])
    ro = compile_rollout(cfg, scfg, 256, 64, target_mesh(cfg, 16))
    out[rules] = ro["decode_collective_bytes_per_step"]
print(json.dumps(out))
"""


def draw_lengths(n: int, median: float, p99: float, cap: int, seed: int):
    """n lengths from a log-normal with this median and 99th percentile, rounded up, in [1, cap]."""
    import numpy as np

    sigma = math.log(p99 / median) / 2.3263478740408408  # z of the 99th percentile
    x = np.random.default_rng(seed).lognormal(math.log(median), sigma, n)
    return np.clip(np.ceil(x), 1, cap).astype(np.int32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--median", type=float, default=50)
    ap.add_argument("--p99", type=float, default=500)
    ap.add_argument("--cap", type=int, default=800)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (one prefill each prompt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps-per-call", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=4, help="batches back to back for the stream (slots kept; 0: none)")
    ap.add_argument("--model", default=None, help="a Hugging Face folder (a real checkpoint) instead of a random model")
    ap.add_argument("--no-collectives", action="store_true", help="skip the 16-device compile of Qwen3-1.7B")
    args = ap.parse_args(argv)
    if args.rows % args.group:
        sys.exit(f"--rows {args.rows} must be a multiple of --group {args.group}")

    import jax
    import numpy as np
    from flax import nnx

    from opd_jax.engine import Engine, EngineSpec
    from opd_jax.rollout_programs import default_split
    from opd_jax.models import ModelConfig, init_model

    if args.model:
        from opd_jax import load_model

        model = load_model(args.model)
        cfg = model.cfg
        args.layers, args.width, args.vocab = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    else:
        cfg = ModelConfig.for_family("qwen3", vocab_size=args.vocab, hidden_size=args.width,
                                     intermediate_size=3 * args.width, num_layers=args.layers, num_heads=4,
                                     num_kv_heads=2, head_dim=args.width // 4,
                                     max_position_embeddings=args.prompt + args.cap)
        model = init_model(cfg, seed=args.seed)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(args.seed)
    n = args.rows // args.group
    ids = rng.integers(3, args.vocab, (n, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    lengths = draw_lengths(args.rows, args.median, args.p99, args.cap, args.seed)
    print(f"{args.rows} rows ({n} prompts x {args.group}), lengths: median {np.median(lengths):.0f}, "
          f"p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}, total {lengths.sum()} tokens; "
          f"model {args.layers} layers x width {args.width}, vocab {args.vocab}; {jax.default_backend()}")

    results = {}
    for name, slots in (("static", args.rows), ("engine", args.slots)):
        spec = EngineSpec(prompt_len=args.prompt, max_new_tokens=args.cap, slots=slots, temperature=1.0,
                          stop=(), steps_per_call=args.steps_per_call, split_layers=default_split())
        engine = Engine(graphdef, cfg, spec)
        jax.block_until_ready(engine.run(params, ids, mask, jax.random.key(1), group=args.group, caps=lengths)[0])  # compiles
        t = time.perf_counter()
        roll, stats = engine.run(params, ids, mask, jax.random.key(1), group=args.group, caps=lengths)
        jax.block_until_ready(roll.tokens)
        secs = time.perf_counter() - t
        assert stats.generated == int(lengths.sum()), (stats.generated, lengths.sum())
        results[name] = dict(occupancy=stats.occupancy, tps=stats.generated / secs, steps=stats.decode_steps,
                             secs=secs, tokens=np.asarray(roll.tokens))
        bound = lengths.sum() / (slots * lengths.max())  # no schedule beats the longest sequence
        queued = (f", {stats.occupancy_while_queued:.3f} while sequences waited ({stats.queued_steps} steps)"
                  if stats.queued_steps else "")
        print(f"  {name:<7} {slots:>4} slots: {stats.decode_steps:>5} decode steps in {stats.dispatches} calls, "
              f"{secs:7.2f} s, {stats.generated / secs:9.1f} tokens/s; occupancy {stats.occupancy:.3f} (at most "
              f"{min(1.0, bound):.3f} with these lengths: sum / (slots x longest)){queued}")
    same = np.array_equal(results["static"]["tokens"], results["engine"]["tokens"])
    print(f"  same tokens on both sides: {same}")

    # asynchronous steady state: --batches batches (fresh lengths each) through one Stream, whose slots
    # persist, so batch b+1 fills what batch b's early finishers free (the sampler never waiting for
    # weights: the upper bound of train.max_staleness >= 1); against the engine run batch by batch
    if args.batches:
        stream_section(args, graphdef, cfg, params, ids, mask, results)

    if not args.no_collectives:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run([sys.executable, "-c", COLLECTIVES, "8192"], capture_output=True, text=True, env=env)
        if run.returncode:
            sys.exit(run.stderr[-2000:])
        c = json.loads(run.stdout.strip().splitlines()[-1])
        w = c["weights"]
        print(f"decode step collectives, Qwen3-1.7B on 16 chips (fsdp 16, 256 slots, 8,192 new tokens), per chip: "
              f"training layout {c['default'] / 1e9:.3f} GB ({c['default'] / w:.2f}x the weights' {w / 1e9:.2f} GB), "
              f"rollout layout {c['rollout']:.0f} bytes ({c['rollout'] / w:.2e}x)")
    s, e = results["static"], results["engine"]
    kept = (f", stream over {args.batches} batches {results['stream']['occupancy']:.2f}" if args.batches else "")
    print(f"occupancy: static {s['occupancy']:.2f}, engine {e['occupancy']:.2f}{kept}")
    print(f"tokens/s: static {s['tps']:.1f}, engine {e['tps']:.1f}, ratio {e['tps'] / s['tps']:.2f}x")


def stream_section(args, graphdef, cfg, params, ids, mask, results):
    """--batches batches (fresh lengths each) through the engine batch by batch and through one Stream."""
    import jax
    import numpy as np

    from opd_jax.engine import Engine, EngineSpec
    from opd_jax.rollout_programs import default_split
    from opd_jax.stream import Stream

    spec = EngineSpec(prompt_len=args.prompt, max_new_tokens=args.cap, slots=args.slots, temperature=1.0, stop=(),
                      steps_per_call=args.steps_per_call, split_layers=default_split())
    draws = [draw_lengths(args.rows, args.median, args.p99, args.cap, args.seed + 1 + b) for b in range(args.batches)]
    engine = Engine(graphdef, cfg, spec)
    t, steps = time.perf_counter(), 0
    for b, caps in enumerate(draws):
        roll, stats = engine.run(params, ids, mask, jax.random.key(10 + b), group=args.group, caps=caps)
        steps += stats.decode_steps
    jax.block_until_ready(roll.tokens)
    per_batch = dict(occupancy=sum(map(int, map(np.sum, draws))) / (args.slots * steps), secs=time.perf_counter() - t)
    stream = Stream(engine, args.group)
    stream.set_params(params, 0)
    t = time.perf_counter()
    for b, caps in enumerate(draws):
        stream.add(b, ids, mask, jax.random.key(10 + b), caps=caps)
    while stream.live or stream.queue:
        stream.advance()
    kept = [stream.take(b)[0] for b in range(args.batches)]
    jax.block_until_ready(kept[-1].tokens)
    total = sum(int(np.sum(c)) for c in draws)
    st = stream.stats
    results["stream"] = dict(occupancy=st.occupancy, secs=time.perf_counter() - t)
    print(f"  {args.batches} batches, {args.slots} slots: engine batch by batch {steps} decode steps, occupancy "
          f"{per_batch['occupancy']:.3f}, {total / per_batch['secs']:.1f} tokens/s; stream (slots kept across "
          f"batches) {st.decode_steps} steps, occupancy {st.occupancy:.3f}, {total / results['stream']['secs']:.1f} "
          "tokens/s")


if __name__ == "__main__":
    main()
