"""Prompt records from a user's file: `.jsonl`, `.json`, `.parquet`, or a folder written by
`datasets.Dataset.save_to_disk`.

A record is a mapping with
  - `prompt`: a string, or `messages`: a list of {"role": str, "content": str} (rendered by the
    tokenizer's chat template, see `opd_jax.tasks.prompts`), exactly one of the two;
  - `domain`: a string (routes the record to a teacher and a verifier);
  - `answer` (optional): a string, or a number (kept as its text).
A bad record is a one-line error naming the file and the row (1-based).

JSON files are parsed with Python's `json` so an answer keeps its exact text (Arrow's type inference
in `datasets`' JSON reader turns "01" into the integer 1 as soon as one record has a numeric
answer); Parquet files and `save_to_disk` folders are read through `datasets`.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

from opd_jax.errors import OpdError
from opd_jax.tasks.domains import Example


def _read_json(path: Path) -> list:
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise OpdError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
        if not isinstance(data, list):
            raise OpdError(f"{path}: expected a JSON list of records")
        return data
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise OpdError(f"{path} row {i}: not valid JSON ({e.msg})") from None
    return out


def _read_arrow(path: Path) -> list:
    import datasets

    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path), keep_in_memory=True)
            if isinstance(ds, datasets.DatasetDict):
                if len(ds) != 1:
                    raise OpdError(f"{path} holds splits {sorted(ds)}; point data.path at one split's folder")
                ds = next(iter(ds.values()))
        else:
            import tempfile

            import pyarrow.parquet as pq
            pq.read_schema(str(path))  # an unreadable file fails here, once, before datasets logs about it
            with tempfile.TemporaryDirectory(prefix="opd-parquet-") as cache:
                ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True, cache_dir=cache)
    except OpdError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets / pyarrow raise many types for unreadable files
        raise OpdError(f"{path} could not be read as a dataset: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return list(ds)


def _example(rec, where: str) -> Example:
    if not isinstance(rec, dict):
        raise OpdError(f"{where}: a record must be a mapping, got {type(rec).__name__}")
    prompt, messages = rec.get("prompt"), rec.get("messages")
    if (prompt is None) == (messages is None):
        raise OpdError(f"{where}: needs exactly one of 'prompt' (a string) or 'messages' (a list of {{role, content}})")
    if prompt is not None and not isinstance(prompt, str):
        raise OpdError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    if messages is not None:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise OpdError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for j, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise OpdError(f"{where}: messages[{j}] must be {{'role': str, 'content': str}}, got {m!r:.80}")
        messages = tuple((m["role"], m["content"]) for m in messages)
    domain = rec.get("domain")
    if not isinstance(domain, str) or not domain:
        raise OpdError(f"{where}: 'domain' must be a non-empty string")
    answer = rec.get("answer")
    if isinstance(answer, bool) or not (answer is None or isinstance(answer, (str, numbers.Number))):
        raise OpdError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
    return Example(prompt, None if answer is None else str(answer), domain, messages)


def load_records(path: str | Path, need_answer=frozenset()) -> list[Example]:
    """Every record of a prompt file or `save_to_disk` folder, as Examples, in file order. A record of
    a domain in `need_answer` (its teacher is privileged: it is shown the answer) without an answer is
    an error naming the file and the row."""
    path = Path(path)
    if not path.exists():
        raise OpdError(f"data.path does not exist: {path}")
    if path.is_dir() or path.suffix == ".parquet":
        rows = list(enumerate(_read_arrow(path), 1))
    elif path.suffix == ".jsonl":
        rows = _read_json(path)
    elif path.suffix == ".json":
        rows = list(enumerate(_read_json(path), 1))
    else:
        raise OpdError(f"data.path {path}: expected a .jsonl, .json or .parquet file or a save_to_disk folder")
    out = [_example(rec, f"{path} row {i}") for i, rec in rows]
    for (i, _), ex in zip(rows, out):
        if ex.answer is None and ex.domain in need_answer:
            raise OpdError(f"{path} row {i}: domain {ex.domain!r} goes to a privileged teacher (it is shown the "
                           "answer) but the record has no 'answer'")
    if not out:
        raise OpdError(f"{path} holds no records")
    return out
