"""A character-level tokenizer for the synthetic tasks, built with `tokenizers` and used through
`transformers.PreTrainedTokenizerFast` like any checkpoint's own tokenizer."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz+-*=:,. "


def build_char_tokenizer(path: str | Path | None, chars: str = CHARS):
    """A `PreTrainedTokenizerFast` over characters (ids: <pad>=0, <bos>=1, <eos>=2, then one per
    character), saved to the folder `path` unless it is None. The files are written to a private
    temporary folder and moved into place, so processes building the same tokenizer concurrently
    (one per host) never read each other's half-written files."""
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   padding_side="left")
    if path is not None:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
            fast.save_pretrained(tmp)
            for f in Path(tmp).iterdir():
                os.replace(f, folder / f.name)
    return fast


def load_tokenizer(path: str | Path):
    """Load a tokenizer folder (tokenizer.json + config) saved by `build_char_tokenizer` or any
    Hugging Face checkpoint, with left padding."""
    from transformers import AutoTokenizer

    from opd_jax.errors import OpdError

    folder = Path(path)
    if not (folder / "tokenizer.json").exists():
        have = "only tokenizer_config.json" if (folder / "tokenizer_config.json").exists() else "none"
        raise OpdError(f"no tokenizer.json in {folder} (tokenizer files there: {have}); opd_jax reads fast "
                       "tokenizers: save one with tokenizer.save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), padding_side="left", trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - tokenizers / transformers raise many types for a broken file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise OpdError(f"the tokenizer in {folder} could not be read: {type(e).__name__}: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def stop_ids(tokenizer, model_dir: str | Path | None = None) -> tuple[int, ...]:
    """Token ids that end a completion: the tokenizer's EOS and every id in the model folder's
    generation_config.json `eos_token_id` (an int or a list; Qwen3 lists <|im_end|> and
    <|endoftext|>). A generation_config.json that cannot be read is a one-line error."""
    import json

    from opd_jax.errors import OpdError

    ids = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    path = Path(model_dir) / "generation_config.json" if model_dir else None
    if path is not None and path.exists():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
            raise OpdError(f"{path} is not a JSON object: {e}") from None
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
            raise OpdError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
        ids.update(eos)
    return tuple(sorted(ids))


def build_bpe_tokenizer(path: str | Path | None, corpus, vocab_size: int = 160):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus` (strings) with the character
    tokenizer's special tokens (<pad>=0, <bos>=1, <eos>=2): a second tokenizer for the same tasks whose
    merges join frequent runs (digit runs, words), for cross-tokenizer distillation. Its alphabet is
    the corpus's characters: text with others cannot round-trip through it. Saved to `path`
    unless it is None."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(corpus), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   padding_side="left")
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(path))
    return fast
