"""Synthetic verifiable tasks, prompt files and the character tokenizer."""

from opd_jax.tasks.domains import DOMAINS, Domain, Example, get_domain, reward
from opd_jax.tasks.data import PromptSource, encode_answers, encode_pairs, encode_prompts, load_jsonl
from opd_jax.tasks.tokenizer import build_char_tokenizer, load_tokenizer, stop_ids

__all__ = ["DOMAINS", "Domain", "Example", "get_domain", "reward", "PromptSource", "encode_answers", "encode_pairs",
           "encode_prompts", "load_jsonl", "build_char_tokenizer", "load_tokenizer", "stop_ids"]
