"""Verifiers: `(completion, answer) -> reward in [0, 1]`, one per domain (`data.verifiers`).

Names (`get_verifier(name)`):
  - `exact`: 1 when the completion (its stop token removed, whitespace stripped) equals the answer.
  - `math`: `math-verify` extracts the completion's final answer (a `\\boxed{}` first, else the last
    expression) and checks it is mathematically equal to the answer, so `\\frac{1}{2}` matches 0.5.
  - `regex:PATTERN`: group 1 of the last match of PATTERN in the completion, stripped, must equal
    the answer exactly (no match: 0).
  - `python:module:function`: a user callable `(completion, answer) -> float`, imported by name.
  - `suffix:SEP`: the text after the last SEP in the completion equals the text after the last SEP
    in the answer (the final result of a worked answer; the built-in `carry` domain uses `suffix::`).
  - `contains`: the answer appears in the completion as a whole word, ignoring case ("Paris" in "The
    capital of France is Paris.").
  - `last_number`: the last number written in the completion equals the answer ("7 + 5 = 12." -> 12).
A missing answer always scores 0. Verifiers feed eval accuracy, pass@k and RL rewards.
"""

from __future__ import annotations

import functools
import importlib
import re
from typing import Callable

from opd_jax.errors import OpdError

Verifier = Callable[[str, "str | None"], float]


def exact(completion: str, answer: str | None) -> float:
    return float(answer is not None and completion.strip() == answer.strip())


def _math_gold(answer: str):
    from math_verify import parse

    text = answer.strip()
    if "\\boxed" not in text and "$" not in text:
        text = f"${text}$"  # a bare gold answer ("x+1", "\\frac{1}{2}") parsed as LaTeX math
    return parse(text)


def math(completion: str, answer: str | None) -> float:
    if answer is None:
        return 0.0
    from math_verify import parse, verify

    gold = _math_gold(answer)
    pred = parse(completion)
    return float(bool(gold) and bool(pred) and verify(gold, pred))


def _regex(pattern: str) -> Verifier:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise OpdError(f"verifier regex:{pattern}: not a valid regular expression ({e})") from None
    if rx.groups < 1:
        raise OpdError(f"verifier regex:{pattern}: needs a capture group (group 1 is compared with the answer)")

    def verify(completion: str, answer: str | None) -> float:
        found = [m.group(1) for m in rx.finditer(completion)]
        return float(answer is not None and bool(found) and found[-1] is not None
                     and found[-1].strip() == answer.strip())

    verify.__name__ = f"regex:{pattern}"
    return verify


def _suffix(sep: str) -> Verifier:
    def verify(completion: str, answer: str | None) -> float:
        return float(answer is not None and sep in completion
                     and completion.rsplit(sep, 1)[1].strip() == answer.rsplit(sep, 1)[-1].strip())

    verify.__name__ = f"suffix:{sep}"
    return verify


def _python(spec: str) -> Verifier:
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise OpdError(f"verifier python:{spec}: expected python:module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise OpdError(f"verifier python:{spec}: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise OpdError(f"verifier python:{spec}: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise OpdError(f"verifier python:{spec}: {name!r} is not callable")

    def verify(completion: str, answer: str | None) -> float:
        out = fn(completion, answer)
        try:
            return float(out)
        except (TypeError, ValueError):
            raise OpdError(f"verifier python:{spec} returned {out!r}, not a number") from None

    verify.__name__ = f"python:{spec}"
    return verify


def contains(completion: str, answer: str | None) -> float:
    if answer is None or not answer.strip():
        return 0.0
    return float(re.search(r"(?<!\w)" + re.escape(answer.strip()) + r"(?!\w)", completion, re.IGNORECASE) is not None)


def last_number(completion: str, answer: str | None) -> float:
    nums = re.findall(r"-?\d+(?:\.\d+)?", completion.replace(",", ""))
    if answer is None or not nums:
        return 0.0
    try:
        return float(float(nums[-1]) == float(answer))
    except ValueError:
        return 0.0


@functools.lru_cache(maxsize=None)
def get_verifier(name: str) -> Verifier:
    """The verifier callable `(completion, answer) -> float` for a name (see the module docstring)."""
    if name == "exact":
        return exact
    if name in ("contains", "last_number"):
        return {"contains": contains, "last_number": last_number}[name]
    if name == "math":
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise OpdError("verifier math needs the math-verify package (pip install math-verify)") from None
        return math
    if name.startswith("regex:"):
        return _regex(name[len("regex:"):])
    if name.startswith("suffix:") and len(name) > len("suffix:"):
        return _suffix(name[len("suffix:"):])
    if name.startswith("python:"):
        return _python(name[len("python:"):])
    raise OpdError(f"unknown verifier {name!r}; use exact, contains, last_number, math, regex:PATTERN, suffix:SEP or "
                   "python:module:function")


def verifiers_for(names: dict, domains) -> dict[str, Verifier]:
    """{domain: verifier} for every domain (exact unless `names` says otherwise). A name for a
    domain that no prompt has is an error (a typo would otherwise leave that domain on exact)."""
    unknown = sorted(set(names) - set(domains))
    if unknown:
        raise OpdError(f"data.verifiers names domain(s) {', '.join(map(repr, unknown))} that no prompt has; "
                       f"domains: {', '.join(domains)}")
    from opd_jax.tasks.domains import CHAT_DOMAINS, DOMAINS, LONG_DOMAINS

    builtin = {**DOMAINS, **LONG_DOMAINS, **CHAT_DOMAINS}
    return {d: get_verifier(str(names.get(d, builtin[d].verifier if d in builtin else "exact"))) for d in domains}
