#!/usr/bin/env bash
# The test command (CI runs exactly this): lint, type-check, then the test suite.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/env.sh"
cd "$repo"
ruff check nestvec tests bench
mypy nestvec
pytest "$@"
