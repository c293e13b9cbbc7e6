"""Tiny stand-ins for chat checkpoints, for trying data files, chat templates and verifiers offline.

`python -m opd_jax.tiny_chat OUT` writes OUT/student and OUT/teacher: random Qwen3 folders (config.json
+ safetensors, written by opd_jax itself, no torch needed) that carry a byte-level BPE tokenizer
trained here with Qwen's special tokens (<|endoftext|> as pad, <|im_end|> as EOS), a Qwen-style chat
template (with Qwen3's `enable_thinking` switch) and a generation_config.json that lists both stop
ids, as Qwen3's does. It also writes OUT/teacher_llama, a random Llama folder with a tokenizer of its
own (another byte-level BPE, trained on other text, that merges digit runs; Llama 3's special tokens,
a BOS its chat template writes, <|eot_id|> as EOS): a teacher for cross-tokenizer distillation
(loss.cross_tokenizer). The models are random: they show the plumbing, not learning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")
CORPUS = ("What is 2+3? The answer is \\boxed{5}.", "Compute \\frac{1}{2} + 0.25 = 0.75 exactly.",
          "You are a careful math tutor. Think step by step.", "system user assistant think seven") * 20


def build_chat_tokenizer(template: str | None = CHAT_TEMPLATE, bos: str | None = None, vocab_size: int = 320):
    """A `PreTrainedTokenizerFast`: byte-level BPE trained on a small corpus, Qwen's special tokens
    (ids 0, 1, 2), EOS <|im_end|>, pad <|endoftext|>, no BOS unless `bos` names one, the chat template
    `template` (None: no template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(CORPUS), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    kw = {} if template is None else {"chat_template": template}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=bos, padding_side="left", **kw)


LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA_CORPUS = tuple(f"{a}+{b}={a + b}. add:{a * 7}+{b}= {a * b} " for a in range(40) for b in range(12))


def build_llama_like_tokenizer(vocab_size: int = 400):
    """Another byte-level BPE (trained on arithmetic text, so digit runs merge) with Llama 3's special
    tokens: BOS <|begin_of_text|> (written by its chat template), EOS <|eot_id|>, pad <|end_of_text|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(LLAMA_CORPUS + CORPUS), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(LLAMA_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>", padding_side="left", chat_template=LLAMA_TEMPLATE)


def write_tiny_chat_models(out: str | Path, hidden_size: int = 64) -> dict[str, Path]:
    """OUT/student and OUT/teacher (different seeds) with the tokenizer and both stop ids, and
    OUT/teacher_llama with a tokenizer and chat template of its own."""
    from opd_jax.models import ModelConfig, init_model, save_model

    out = Path(out)
    tok = build_chat_tokenizer()
    stops = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    folders = {}
    for name, seed in (("student", 0), ("teacher", 1)):
        cfg = ModelConfig(model_type="qwen3", vocab_size=len(tok), hidden_size=hidden_size,
                          intermediate_size=2 * hidden_size, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          eos_token_id=stops[0], max_position_embeddings=512)
        folder = save_model(init_model(cfg, seed=seed), out / name)
        tok.save_pretrained(folder)
        (Path(folder) / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
        folders[name] = Path(folder)
    other = build_llama_like_tokenizer()
    cfg = ModelConfig(model_type="llama", vocab_size=len(other), hidden_size=hidden_size,
                      intermediate_size=2 * hidden_size, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      eos_token_id=other.eos_token_id, bos_token_id=other.bos_token_id, max_position_embeddings=512)
    folder = save_model(init_model(cfg, seed=2), out / "teacher_llama")
    other.save_pretrained(folder)
    folders["teacher_llama"] = Path(folder)
    return folders


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m opd_jax.tiny_chat OUT_FOLDER")
    for name, path in write_tiny_chat_models(sys.argv[1]).items():
        print(f"wrote {name}: {path}")
