#!/usr/bin/env bash
# Creates .venv on first use (CPU torch first, so the torch>=2.2 range is already met
# and pip never pulls a CUDA build), then installs nestvec editable with its dev extras.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
stamp="$venv/.nestvec-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  log="$venv/install.log"
  echo "nestvec: installing into $venv (log: $log) ..." >&2
  {
    "$venv/bin/pip" install --upgrade pip
    "$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/pip" install "torch==2.13.0"
    "$venv/bin/pip" install -e "$repo[dev]"
  } >"$log" 2>&1 || { tail -n 40 "$log" >&2; exit 1; }
  touch "$stamp"
fi
# gRPC stubs are generated from protos/ (never committed); regenerate when the proto changed.
"$venv/bin/python" -m nestvec.wire.generate --check >/dev/null 2>&1 || "$venv/bin/python" -m nestvec.wire.generate >/dev/null
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH="$venv/bin:$PATH"
