"""Synthetic verifiable domains: each makes prompts with a known answer and checks completions.

A prompt is text like "add:47+385=" and the answer the exact string after "=" ("432"); the reward is
1 for an exact match (the completion up to EOS), else 0. Generators are pure functions of a numpy
RandomState, so a batch is a function of (seed, step) and a resumed run sees the same data.
"""

from __future__ import annotations

import functools

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
    verifier: str = "exact"  # the default `data.verifiers` entry for this domain
    make_held_out: Callable | None = None  # evaluation prompts disjoint from `make`'s (None: same generator)

    def example(self, rng: np.random.RandomState, held_out: bool = False) -> Example:
        prompt, answer = (self.make_held_out if held_out and self.make_held_out else self.make)(rng)
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


def _carry(rng, lo=3, hi=4):
    """Addition written out digit by digit, least significant first, each step with its carry in (when
    there is one), then the sum: "carry:472+389=" -> "2+9=11,7+8+1=16,4+3+1=8:861" (21 to 39
    characters). A wrong digit or carry in one step derails every later step and the sum."""
    n = int(rng.randint(lo, hi + 1))
    a, b = (int(rng.randint(10 ** (n - 1), 10 ** n)) for _ in range(2))
    steps, carry = [], 0
    for da, db in zip(reversed(str(a)), reversed(str(b))):
        total = int(da) + int(db) + carry
        steps.append(f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return f"carry:{a}+{b}=", ",".join(steps) + f":{a + b}"


DOMAINS: dict[str, Domain] = {
    "addition": Domain("addition", _addition),
    "reverse": Domain("reverse", _reverse),
    "sort": Domain("sort", _sort),
}


# long-horizon domains: answers of 15 to 40 tokens where an early mistake compounds (not in the default
# data.domains, whose prompts fit 16 tokens)
LONG_DOMAINS: dict[str, Domain] = {
    "carry": Domain("carry", _carry, verifier="suffix::"),
}


# chat domains for a real instruct model (SmolLM2-135M-Instruct and up): questions in plain words, rendered
# through the model's chat template (data.chat_template: true); answers checked inside a free-form reply
CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing"), ("Greece", "Athens"),
            ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
            ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Chile", "Santiago"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
            ("Canada", "Ottawa"), ("Australia", "Canberra"), ("India", "New Delhi"), ("Thailand", "Bangkok"),
            ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
            ("Cuba", "Havana"), ("Colombia", "Bogota"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
            ("Czech Republic", "Prague"), ("Switzerland", "Bern"), ("Morocco", "Rabat"))


def _capital(rng, held_out: bool = False):
    """Training prompts ask about the countries at even positions of CAPITALS, evaluation the odd ones."""
    pool = CAPITALS[1::2] if held_out else CAPITALS[0::2]
    country, city = pool[int(rng.randint(len(pool)))]
    return f"What is the capital of {country}?", city


SUM_PAIRS = tuple((a, b) for a in range(10) for b in range(10))


def _sum_digits(rng, held_out: bool = False):
    """Evaluation asks the 25 pairs (a, b) with (a + 2b) % 4 == 0; training the other 75."""
    pool = [p for p in SUM_PAIRS if ((p[0] + 2 * p[1]) % 4 == 0) == held_out]
    a, b = pool[int(rng.randint(len(pool)))]
    return f"What is {a} + {b}?", str(a + b)


CHAT_DOMAINS: dict[str, Domain] = {
    "capital": Domain("capital", _capital, verifier="contains",
                      make_held_out=functools.partial(_capital, held_out=True)),
    "sum_digits": Domain("sum_digits", _sum_digits, verifier="last_number",
                         make_held_out=functools.partial(_sum_digits, held_out=True)),
}


def get_domain(name: str) -> Domain:
    known = {**DOMAINS, **LONG_DOMAINS, **CHAT_DOMAINS}
    if name not in known:
        raise OpdError(f"unknown task domain {name!r}; built-in domains: {', '.join(known)}")
    return known[name]


def reward(completion: str, answer: str | None) -> float:
    """Exact-match reward: 1.0 when the completion (text before EOS, stripped) equals the answer."""
    return float(answer is not None and completion.strip() == answer)
