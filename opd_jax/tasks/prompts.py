"""From an example to the exact prompt text and token ids the models see.

- A record with `messages` (and a string prompt when `data.chat_template` is true, as one user
  message) is rendered by the tokenizer's own chat template with the generation prompt appended
  (`apply_chat_template(..., add_generation_prompt=True, **data.chat_template_kwargs)`), then
  tokenized with no special tokens added: whatever the template writes (a BOS included) appears
  once.
- A raw string prompt gets the tokenizer's BOS in front when it has one and the prompt does not
  already start with it.
Rows are left-padded to `data.max_prompt_len`; a longer prompt is a one-line error.
"""

from __future__ import annotations

import numpy as np

from opd_jax.errors import OpdError
from opd_jax.tasks.domains import Example


class Prompter:
    """`text(ex)`: the prompt exactly as tokenized; `ids(ex)`: its token ids; `encode(examples, max_len)`:
    left-padded ids and mask [B, max_len] int32. Examples may also be plain strings."""

    def __init__(self, tokenizer, chat_template: bool = False, template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.chat = bool(chat_template)
        self.kwargs = dict(template_kwargs or {})
        self._cache: dict = {}

    def _messages(self, ex: Example):
        if ex.messages is not None:
            return ex.messages
        return (("user", ex.prompt),) if self.chat else None

    def _render(self, ex: Example) -> tuple[str, list[int]]:
        tok = self.tokenizer
        msgs = self._messages(ex)
        if msgs is None:
            ids = tok.encode(ex.prompt, add_special_tokens=False)
            bos = tok.bos_token_id
            if bos is not None and (not ids or ids[0] != bos):
                return tok.bos_token + ex.prompt, [bos] + ids
            return ex.prompt, ids
        if not getattr(tok, "chat_template", None):
            why = "records have 'messages'" if ex.messages is not None else "data.chat_template is true"
            raise OpdError(f"{why} but the tokenizer ({getattr(tok, 'name_or_path', '?') or 'built-in'}) has no chat "
                           "template: use a tokenizer folder whose tokenizer_config.json has one, or plain 'prompt' strings")
        try:
            text = tok.apply_chat_template([{"role": r, "content": c} for r, c in msgs], tokenize=False,
                                           add_generation_prompt=True, **self.kwargs)
        except Exception as e:  # noqa: BLE001 - jinja errors name the template's own complaint
            raise OpdError(f"the chat template failed on {list(msgs)!r:.80}: {type(e).__name__}: {e}") from None
        return text, tok.encode(text, add_special_tokens=False)

    def _get(self, ex):
        ex = Example(ex, None, "") if isinstance(ex, str) else ex
        hit = self._cache.get(ex)
        if hit is None:
            if len(self._cache) > 65536:  # synthetic domains make new prompts every step
                self._cache.clear()
            hit = self._cache[ex] = self._render(ex)
        return hit

    def text(self, ex) -> str:
        return self._get(ex)[0]

    def ids(self, ex) -> list[int]:
        return self._get(ex)[1]

    def encode(self, examples, max_len: int):
        rows = [self.ids(ex) for ex in examples]
        return pad_left(rows, max_len, self.tokenizer.pad_token_id or 0,
                        lambda r: repr(self.text(examples[r])[:60]))


def pad_left(rows: list[list[int]], max_len: int, pad: int, describe=lambda r: f"row {r}"):
    """Left-padded ids and mask [B, max_len] int32; a row longer than max_len is an error."""
    longest = max(len(x) for x in rows)
    if longest > max_len:
        bad = int(np.argmax([len(x) for x in rows]))
        raise OpdError(f"prompt of {longest} tokens exceeds data.max_prompt_len={max_len}: {describe(bad)}")
    out = np.full((len(rows), max_len), pad, np.int32)
    mask = np.zeros((len(rows), max_len), np.int32)
    for r, x in enumerate(rows):
        if x:
            out[r, max_len - len(x):] = x
            mask[r, max_len - len(x):] = 1
    return out, mask
