"""How far the planner's roofline estimate is from a measured time: the rollout engine's prefill and
decode programs for a Qwen3-1.7B-shaped student (random bfloat16 weights), timed on whatever
accelerator JAX finds, next to `opd_jax.roofline.estimate` of the same compiled programs with that
chip's published peak rates (--peak-tflops, --hbm-gbs).

No TPU is lent to this project; run on a GPU it says how far such an estimate sits from a measurement
of the same program on real hardware, not on a TPU.

    python scripts/roofline_check.py --peak-tflops 989 --hbm-gbs 4800    # H200 SXM, dense bf16
"""

from __future__ import annotations

import argparse
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peak-tflops", type=float, required=True)
    ap.add_argument("--hbm-gbs", type=float, required=True)
    ap.add_argument("--slots", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from opd_jax.engine import EngineSpec, sequence_keys
    from opd_jax.rollout_programs import decode, empty, insert, prefill
    from opd_jax.models import init_model
    from opd_jax.models.released import qwen3_config
    from opd_jax.models.transformer import unrolled_layers
    from opd_jax.roofline import Chip, estimate

    chip = Chip("measured", args.peak_tflops * 1e12, args.hbm_gbs * 1e9, 1.0, 0)
    cfg = qwen3_config("Qwen3-1.7B", args.layers).replace(max_position_embeddings=args.prompt + args.new)
    model = init_model(cfg, seed=0)
    graphdef, state = nnx.split(model)
    params = jax.device_put(nnx.to_pure_dict(state))
    print(f"{jax.devices()[0].device_kind}: Qwen3-1.7B shape, {args.layers} layers, bf16; prompt {args.prompt}, "
          f"cache {args.prompt + args.new} slots per sequence")

    def timed(fn, *a):
        out = fn(*a)
        jax.block_until_ready(out)
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            best = min(best, time.perf_counter() - t)
        return best, out

    for s in args.slots:
        spec = EngineSpec(prompt_len=args.prompt, max_new_tokens=args.new, slots=s, temperature=1.0, steps_per_call=1)
        rng = np.random.default_rng(0)
        ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (s, args.prompt)), jnp.int32)
        mask = jnp.ones_like(ids)
        st = dict(mesh=None, rules=None)
        pre = lambda p, i, m: prefill(graphdef, p, i, m, **st)  # noqa: E731
        t_pre, store = timed(pre, params, ids, mask)
        slots = empty(cfg=cfg, spec=spec, **st)
        every = jnp.ones((s,), bool)
        slots = insert(slots, store, every, jnp.arange(s, dtype=jnp.int32), jnp.arange(s, dtype=jnp.int32),
                        jnp.full((s,), args.new, jnp.int32), jnp.asarray(sequence_keys(jax.random.key(0), np.arange(s))),
                        spec=spec, **st)
        # decode: one step per call; the cache fills as it runs (time the steps after a warm-up of 64)
        one = jnp.int32(1)
        for _ in range(64):
            slots, _ = decode(graphdef, params, slots, one, spec=spec, **st)
        jax.block_until_ready(slots.gen)
        n = 64
        t = time.perf_counter()
        for _ in range(n):
            slots, _ = decode(graphdef, params, slots, one, spec=spec, **st)
        jax.block_until_ready(slots.gen)
        t_dec = (time.perf_counter() - t) / n
        with unrolled_layers():
            e_pre = estimate(prefill.lower(graphdef, params, ids, mask, **st).compile(), chip)
            e_dec = estimate(decode.lower(graphdef, params, slots, one, spec=spec, **st).compile(), chip)
        for name, t_meas, e in (("prefill", t_pre, e_pre), ("decode step", t_dec, e_dec)):
            print(f"  {s:>4} slots {name:<12} measured {t_meas * 1e3:9.3f} ms, roofline {e.seconds * 1e3:9.3f} ms "
                  f"({e.bound}-bound: {e.flops / 1e9:.1f} GFLOP, {e.hbm_bytes / 1e9:.2f} GB), "
                  f"measured / estimate {t_meas / e.seconds:.2f}x")
        print(f"  {s:>4} slots decode: {s / t_dec:.0f} tokens/s at {int(np.asarray(slots.gen).mean()) + args.prompt} "
              "filled slots per sequence")


if __name__ == "__main__":
    main()
