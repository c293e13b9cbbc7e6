"""Synthetic verifiable domains: each makes prompts with a known answer and checks completions.

A prompt is text like "add:47+385=" and the answer the exact string after "=" ("432"); the reward is
1 for an exact match (the completion up to EOS), else 0. Generators are pure functions of a numpy
RandomState, so a batch is a function of (seed, step) and a resumed run sees the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from opd_jax.errors import OpdError

LETTERS = "abcdefgh"


@dataclass(frozen=True)
class Example:
    prompt: str | None  # raw prompt text (None when `messages` is given)
    answer: str | None
    domain: str
    messages: tuple | None = None  # ((role, content), ...) rendered by the tokenizer's chat template


@dataclass(frozen=True)
class Domain:
    name: str
    make: Callable[[np.random.RandomState], tuple[str, str]]

    def example(self, rng: np.random.RandomState) -> Example:
        prompt, answer = self.make(rng)
        return Example(prompt, answer, self.name)


def _addition(rng):
    a, b = int(rng.randint(0, 100)), int(rng.randint(0, 10))
    return f"add:{a}+{b}=", str(a + b)


def _reverse(rng, lo=3, hi=5):
    s = "".join(rng.choice(list(LETTERS), size=rng.randint(lo, hi + 1)))
    return f"rev:{s}=", s[::-1]


def _sort(rng, lo=3, hi=5):
    s = "".join(str(d) for d in rng.randint(0, 10, size=rng.randint(lo, hi + 1)))
    return f"sort:{s}=", "".join(sorted(s))


DOMAINS: dict[str, Domain] = {
    "addition": Domain("addition", _addition),
    "reverse": Domain("reverse", _reverse),
    "sort": Domain("sort", _sort),
}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise OpdError(f"unknown task domain {name!r}; built-in domains: {', '.join(DOMAINS)}")
    return DOMAINS[name]


def reward(completion: str, answer: str | None) -> float:
    """Exact-match reward: 1.0 when the completion (text before EOS, stripped) equals the answer."""
    return float(answer is not None and completion.strip() == answer)
