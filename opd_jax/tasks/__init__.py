"""Synthetic verifiable tasks, prompt files, prompt rendering (chat templates), verifiers and tokenizers."""

from opd_jax.tasks.domains import DOMAINS, LONG_DOMAINS, Domain, Example, get_domain, reward
from opd_jax.tasks.data import PromptSource, encode_answers, encode_pairs, encode_prompts
from opd_jax.tasks.prompts import Prompter
from opd_jax.tasks.records import load_records
from opd_jax.tasks.verifiers import get_verifier, verifiers_for
from opd_jax.tasks.tokenizer import build_char_tokenizer, load_tokenizer, stop_ids

__all__ = ["DOMAINS", "LONG_DOMAINS", "Domain", "Example", "get_domain", "reward", "PromptSource", "encode_answers", "encode_pairs",
           "encode_prompts", "Prompter", "load_records", "get_verifier", "verifiers_for", "build_char_tokenizer", "load_tokenizer", "stop_ids"]
