"""Prompt sources and batching: built-in domains or a user's prompt file (`data.path`), balanced by domain.

A batch for step s is a pure function of (seed, s): a resumed run sees exactly the prompts it would
have seen. Rows are grouped by domain in a fixed order, `per_domain` prompts each, so each teacher
scores a fixed-size, contiguous slice of the batch.
"""

from __future__ import annotations

import numpy as np

from opd_jax.errors import OpdError
from opd_jax.tasks.domains import get_domain
from opd_jax.tasks.prompts import Prompter
from opd_jax.tasks.records import load_records


class PromptSource:
    """Balanced prompt batches from built-in domains (`domains`) and/or a prompt file (`path`)."""

    def __init__(self, domains: list[str] = (), path: str | None = None, seed: int = 0, need_answer=frozenset()):
        self.seed = seed
        self.pools: dict[str, list[Example]] = {}
        self.generators = {d: get_domain(d) for d in domains}
        if path:
            for ex in load_records(path, need_answer):
                self.pools.setdefault(ex.domain, []).append(ex)
        self.domains = sorted(set(self.generators) | set(self.pools))
        if not self.domains:
            raise OpdError("no prompt source: set data.domains or data.path")

    def batch(self, step: int, per_domain: int, stream: int = 0) -> list[Example]:
        """`per_domain` examples of every domain (domains in sorted order) for `step`. Stream 1 is the
        evaluation stream: built-in domains with a held-out generator draw from it there."""
        rng = np.random.RandomState(np.random.SeedSequence([self.seed, stream, step]).generate_state(1)[0])
        out = []
        for d in self.domains:
            if d in self.pools:
                pool = self.pools[d]
                out.extend(pool[i] for i in rng.randint(0, len(pool), per_domain))
            else:
                out.extend(self.generators[d].example(rng, held_out=stream == 1) for _ in range(per_domain))
        return out


def encode_prompts(tokenizer, prompts: list, max_len: int):
    """Left-padded ids and mask, [B, max_len] int32, of raw string prompts (BOS in front when the
    tokenizer has one) or Examples, through `Prompter`. A prompt longer than max_len is an error."""
    return Prompter(tokenizer).encode(prompts, max_len)


def encode_pairs(prompter, prompts: list, completions: list[str], max_prompt_len: int, max_new: int):
    """Prompt + completion token rows [B, P+N], the prompt mask [B, P] and completion mask [B, N]
    (numpy int32, on the host: the caller places them). prompter: a `Prompter` (or a tokenizer: raw
    prompts); prompts: strings or Examples."""
    prompter = prompter if isinstance(prompter, Prompter) else Prompter(prompter)
    tok = prompter.tokenizer
    ids, pmask = prompter.encode(prompts, max_prompt_len)
    ans, amask = encode_answers(tok, completions, max_new, tok.eos_token_id)
    return np.concatenate([ids, ans], 1).astype(np.int32), pmask.astype(np.int32), amask


def encode_answers(tokenizer, answers: list[str], max_new: int, eos_id: int):
    """Right-aligned completions (answer then EOS, padded after) [B, max_new] and their mask."""
    out = np.zeros((len(answers), max_new), np.int32)
    mask = np.zeros((len(answers), max_new), np.int32)
    for r, a in enumerate(answers):
        x = (tokenizer.encode(a, add_special_tokens=False) + [eos_id])[:max_new]
        out[r, : len(x)] = x
        mask[r, : len(x)] = 1
    return out, mask
