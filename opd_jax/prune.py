"""`opd-jax prune-layers --model DIR --keep N --out DIR`: a depth-pruned student, the layers kept chosen
by the divergence to the full model.

Greedy, one layer at a time: with the layers left, try removing each one and measure

    D(drop i) = mean over positions of KL( p_full(. | x_<t) || p_without_i(. | x_<t) )

on held-out text (prompts rendered by the model's own chat template, followed by the full model's greedy
answer to each: the text the student will be asked to reproduce); remove the layer with the smallest
D; repeat until N layers are left. Every candidate of one round has the same depth, so one compiled
forward serves the whole round (the kept layers are gathered from the scanned stack inside it). The
choice, the divergence after each removal and the final top-1 agreement are written to
OUT/pruning.json beside the Hugging Face folder (config.json, model.safetensors, the tokenizer files
and generation_config.json copied from DIR).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.errors import OpdError

HELD_OUT = ("What is the capital of Italy?", "What is 3 + 4?", "Explain gravity in one sentence.",
            "Name an animal that lives in the sea.", "What colour is the sky on a clear day?",
            "Give a synonym of 'happy'.", "What is 9 - 2?", "Write one sentence about the moon.")


def keep_layers(model, keep: list[int]):
    """A copy of `model` with only the layers `keep` (indices into its stack, in order)."""
    graphdef, state = nnx.split(model)
    cfg = model.cfg.replace(num_layers=len(keep))
    from opd_jax.models.transformer import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    new_graphdef, new_state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    idx = np.asarray(keep)
    pure["layers"] = {k: v[idx] for k, v in pure["layers"].items()}
    nnx.replace_by_pure_dict(new_state, pure)
    return nnx.merge(new_graphdef, new_state)


def held_out_text(model, tokenizer, stop, prompts=HELD_OUT, max_new_tokens: int = 32):
    """(ids [B, T], mask [B, T]) of each prompt (chat template) + the model's greedy answer, left-padded."""
    from opd_jax.engine import generate
    from opd_jax.tasks.prompts import pad_left

    rows = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for q in prompts]
    pad = tokenizer.pad_token_id or 0
    ids, mask = pad_left(rows, max(map(len, rows)), pad)
    out = generate(model, jnp.asarray(ids), jnp.asarray(mask), key=jax.random.key(0), max_new_tokens=max_new_tokens,
                   temperature=0.0, eos_id=stop, pad_id=pad)
    comp_mask = np.asarray(out.mask)
    return np.asarray(out.tokens), np.concatenate([mask, comp_mask], 1).astype(np.int32)


def _log_probs(graphdef, state, ids, mask):
    m = nnx.merge(graphdef, state)
    return jax.nn.log_softmax(m(ids, mask).astype(jnp.float32), -1)


_forward = jax.jit(_log_probs, static_argnums=0)


@functools.lru_cache(maxsize=8)
def _kept_forward(cfg):
    """A jitted (full pure params, kept layer indices [k], ids, mask) -> log-probs of the k-layer model
    `cfg`: the layers are gathered inside the program (no host copy of the weights per candidate)."""
    from opd_jax.models.transformer import Transformer

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

    @jax.jit
    def fwd(pure, idx, ids, mask):
        pure = {**pure, "layers": {k: v[idx] for k, v in pure["layers"].items()}}
        state = jax.tree.map(lambda x: x, abstract)
        nnx.replace_by_pure_dict(state, pure)
        return _log_probs(graphdef, state, ids, mask)

    return fwd


def _scores(full_lp, lp, mask) -> tuple[float, float]:
    real = (mask[:, 1:] * mask[:, :-1]).astype(bool)  # position t predicts token t + 1, both real
    kl = jnp.sum(jnp.exp(full_lp) * (full_lp - lp), -1)[:, :-1]
    agree = (full_lp.argmax(-1) == lp.argmax(-1))[:, :-1]
    return float(kl[real].mean()), float(agree[real].mean())


def divergence(full_lp, model, ids, mask) -> tuple[float, float]:
    """(mean KL(full || model) over the real next-token positions, top-1 agreement there)."""
    graphdef, state = nnx.split(model)
    return _scores(full_lp, _forward(graphdef, state, ids, mask), mask)


def prune_layers(model_dir, keep: int | None, out, *, drop=None, log=print, force: bool = False) -> dict:
    """Write the `keep`-layer student of `model_dir` to `out` (see the module docstring) -> the record.
    drop: layer indices to remove instead of the search (a choice recorded by an earlier search); the
    divergence and top-1 agreement are measured and recorded the same way."""
    from opd_jax.models import load_model, save_model
    from opd_jax.tasks import load_tokenizer, stop_ids

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").exists():
        raise OpdError(f"--model {model_dir} is not a Hugging Face model folder (no config.json)")
    if out.exists() and not force:
        raise OpdError(f"{out} already exists; pass --force to replace it")
    full = load_model(model_dir)
    n = full.cfg.num_layers
    if drop is not None:
        drop = sorted(set(int(i) for i in drop))
        if not drop or drop[0] < 0 or drop[-1] >= n or len(drop) >= n:
            raise OpdError(f"--drop must name 1 to {n - 1} distinct layers in [0, {n - 1}], got {drop}")
        if keep is not None and keep != n - len(drop):
            raise OpdError(f"--keep {keep} disagrees with --drop ({len(drop)} of {n} layers leaves {n - len(drop)})")
        keep = n - len(drop)
    if keep is None or not 1 <= keep < n:
        raise OpdError(f"--keep must be in [1, {n - 1}] for a model of {n} layers, got {keep}")
    tok = load_tokenizer(model_dir)
    ids, mask = held_out_text(full, tok, stop_ids(tok, model_dir))
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    graphdef, state = nnx.split(full)
    full_lp = _forward(graphdef, state, ids, mask)
    pure = nnx.to_pure_dict(state)
    left, history = [i for i in range(n) if i not in (drop or ())], [{"dropped": i, "given": True} for i in drop or ()]
    while len(left) > keep:
        fwd, scores = _kept_forward(full.cfg.replace(num_layers=len(left) - 1)), []
        for i in left:
            idx = jnp.asarray([j for j in left if j != i], jnp.int32)
            kl, _ = _scores(full_lp, fwd(pure, idx, ids, mask), mask)
            scores.append((kl, i))
        kl, drop = min(scores)
        left.remove(drop)
        history.append({"dropped": drop, "kl": round(kl, 4), "layers": len(left)})
        log(f"  drop layer {drop:2d}: KL to the full model {kl:.3f} nats/token ({len(left)} layers left)")
    student = keep_layers(full, left)
    kl, agree = divergence(full_lp, student, ids, mask)
    tmp = out.with_name(out.name + ".pruning")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(student, tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json"):
        if (model_dir / f).exists():
            shutil.copy(model_dir / f, tmp / f)
    record = {"source": str(model_dir), "layers": n, "kept": left, "dropped": [h["dropped"] for h in history],
              "history": history, "kl": round(kl, 4), "top1_agreement": round(agree, 4),
              "held_out_prompts": list(HELD_OUT), "positions": int((np.asarray(mask)[:, 1:] * np.asarray(mask)[:, :-1]).sum())}
    (tmp / "pruning.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return record
