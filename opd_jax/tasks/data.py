"""Prompt sources and batching: built-in domains or a user's JSONL file, balanced by domain.

A batch for step s is a pure function of (seed, s): a resumed run sees exactly the prompts it would
have seen. Rows are grouped by domain in a fixed order, `per_domain` prompts each, so each teacher
scores a fixed-size, contiguous slice of the batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from opd_jax.errors import OpdError
from opd_jax.tasks.domains import Example, get_domain


def load_jsonl(path: str | Path) -> list[Example]:
    """Read `{"prompt": str, "domain": str, "answer": str (optional)}` per line."""
    path = Path(path)
    if not path.exists():
        raise OpdError(f"prompt file does not exist: {path}")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise OpdError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("domain"), str):
            raise OpdError(f"{path}:{i}: each line needs string fields 'prompt' and 'domain'")
        ans = rec.get("answer")
        if ans is not None and not isinstance(ans, str):
            raise OpdError(f"{path}:{i}: 'answer' must be a string")
        out.append(Example(rec["prompt"], ans, rec["domain"]))
    if not out:
        raise OpdError(f"prompt file {path} holds no prompts")
    return out


class PromptSource:
    """Balanced prompt batches from built-in domains (`domains`) and/or a JSONL file."""

    def __init__(self, domains: list[str] = (), jsonl: str | None = None, seed: int = 0):
        self.seed = seed
        self.pools: dict[str, list[Example]] = {}
        self.generators = {d: get_domain(d) for d in domains}
        if jsonl:
            for ex in load_jsonl(jsonl):
                self.pools.setdefault(ex.domain, []).append(ex)
        self.domains = sorted(set(self.generators) | set(self.pools))
        if not self.domains:
            raise OpdError("no prompt source: set data.domains or data.jsonl")

    def batch(self, step: int, per_domain: int, stream: int = 0) -> list[Example]:
        """`per_domain` examples of every domain (domains in sorted order) for `step`."""
        rng = np.random.RandomState(np.random.SeedSequence([self.seed, stream, step]).generate_state(1)[0])
        out = []
        for d in self.domains:
            if d in self.pools:
                pool = self.pools[d]
                out.extend(pool[i] for i in rng.randint(0, len(pool), per_domain))
            else:
                out.extend(self.generators[d].example(rng) for _ in range(per_domain))
        return out


def encode_prompts(tokenizer, prompts: list[str], max_len: int, add_bos: bool = True):
    """Left-padded ids and mask, [B, max_len] int32. A prompt longer than max_len is an error."""
    ids = [([tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else [])
           + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    longest = max(len(x) for x in ids)
    if longest > max_len:
        bad = prompts[int(np.argmax([len(x) for x in ids]))]
        raise OpdError(f"prompt of {longest} tokens exceeds data.max_prompt_len={max_len}: {bad[:60]!r}")
    pad = tokenizer.pad_token_id or 0
    out = np.full((len(ids), max_len), pad, np.int32)
    mask = np.zeros((len(ids), max_len), np.int32)
    for r, x in enumerate(ids):
        out[r, max_len - len(x):] = x
        mask[r, max_len - len(x):] = 1
    return out, mask


def encode_pairs(tokenizer, prompts: list[str], completions: list[str], max_prompt_len: int, max_new: int):
    """Prompt + completion token rows [B, P+N] (jax), the prompt mask [B, P] and completion mask [B, N]."""
    import jax.numpy as jnp

    ids, pmask = encode_prompts(tokenizer, prompts, max_prompt_len)
    ans, amask = encode_answers(tokenizer, completions, max_new, tokenizer.eos_token_id)
    return jnp.asarray(np.concatenate([ids, ans], 1)), jnp.asarray(pmask), jnp.asarray(amask)


def encode_answers(tokenizer, answers: list[str], max_new: int, eos_id: int):
    """Right-aligned completions (answer then EOS, padded after) [B, max_new] and their mask."""
    out = np.zeros((len(answers), max_new), np.int32)
    mask = np.zeros((len(answers), max_new), np.int32)
    for r, a in enumerate(answers):
        x = (tokenizer.encode(a, add_special_tokens=False) + [eos_id])[:max_new]
        out[r, : len(x)] = x
        mask[r, : len(x)] = 1
    return out, mask
