"""Built-in tasks, prompt files and the character tokenizer."""

import re

import pytest
import transformers

from opd_jax import OpdError
from opd_jax.tasks import (DOMAINS, PromptSource, build_char_tokenizer, encode_prompts, load_records, load_tokenizer,
                           reward)


def _solve(prompt: str) -> str:
    """An independent solver for the built-in prompts."""
    kind, body = prompt[:-1].split(":", 1)
    if kind == "add":
        a, b = body.split("+")
        return str(int(a) + int(b))
    if kind == "rev":
        return "".join(reversed(body))
    if kind == "sort":
        return "".join(sorted(body))
    raise ValueError(prompt)


def test_domain_answers_are_correct_and_batches_balanced_and_reproducible():
    src = PromptSource(list(DOMAINS), seed=3)
    batch = src.batch(5, 10)
    assert [e.domain for e in batch] == [d for d in sorted(DOMAINS) for _ in range(10)]
    for ex in batch:
        assert ex.answer == _solve(ex.prompt)
        assert reward(ex.answer, ex.answer) == 1.0 and reward(ex.answer + "1", ex.answer) == 0.0
    again = PromptSource(list(DOMAINS), seed=3).batch(5, 10)
    assert [e.prompt for e in again] == [e.prompt for e in batch]
    assert [e.prompt for e in src.batch(6, 10)] != [e.prompt for e in batch]


def test_jsonl_prompts_and_malformed_line_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "add:1+2=", "domain": "math", "answer": "3"}\n\n{"prompt": "hi", "domain": "chat"}\n')
    exs = load_records(good)
    assert [(e.prompt, e.domain, e.answer) for e in exs] == [("add:1+2=", "math", "3"), ("hi", "chat", None)]
    assert PromptSource([], path=str(good)).domains == ["chat", "math"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "domain": "x"}\n{"prompt": "b"\n')
    with pytest.raises(OpdError, match=re.escape(f"{bad} row 2: not valid JSON")):
        load_records(bad)
    bad.write_text('{"prompt": 3, "domain": "x"}\n')
    with pytest.raises(OpdError, match="row 1: 'prompt' must be a string"):
        load_records(bad)
    with pytest.raises(OpdError, match="does not exist"):
        load_records(tmp_path / "none.jsonl")


def test_tokenizer_round_trips_through_transformers(tmp_path):
    build_char_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    ids = tok.encode("sort:3142=", add_special_tokens=False)
    assert len(ids) == 10 and tok.decode(ids) == "sort:3142="
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    out, mask = encode_prompts(tok, ["add:1+2=", "rev:abcde="], 12)
    assert out.shape == (2, 12) and mask[0].tolist() == [0] * 3 + [1] * 9 and out[0, 3] == 1
    with pytest.raises(OpdError, match="exceeds data.max_prompt_len=5"):
        encode_prompts(tok, ["add:1+2="], 5)


def test_carry_domain_writes_every_digit_step_and_scores_the_final_sum():
    """The long-horizon domain, checked by an independent column-addition solver: every step's digits,
    carry in and total, the final sum, 21 to 39 characters; its default verifier scores the sum only."""
    import numpy as np

    from opd_jax.tasks import LONG_DOMAINS, get_domain, verifiers_for

    dom = get_domain("carry")
    rng = np.random.RandomState(0)
    lengths = []
    for _ in range(200):
        ex = dom.example(rng)
        a, b = (int(x) for x in ex.prompt[len("carry:"):-1].split("+"))
        steps, total = ex.answer.split(":")
        assert int(total) == a + b
        carry = 0
        for k, step in enumerate(steps.split(",")):
            da, db = (a // 10 ** k) % 10, (b // 10 ** k) % 10
            assert step == f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={da + db + carry}"
            carry = (da + db + carry) // 10
        lengths.append(len(ex.answer))
    assert 21 <= min(lengths) and max(lengths) <= 39
    verify = verifiers_for({}, ["carry", "addition"])
    gold = "2+9=11,7+8+1=16,4+3+1=8:861"
    assert verify["carry"](gold, gold) == 1.0 and verify["carry"]("2+9=11,7+8=15:861", gold) == 1.0
    assert verify["carry"]("2+9=11,7+8+1=16,4+3+1=8:851", gold) == 0.0 and verify["carry"]("861", gold) == 0.0
    assert verify["addition"]("861", "861") == 1.0 and "carry" in LONG_DOMAINS
