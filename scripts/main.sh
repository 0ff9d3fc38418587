#!/usr/bin/env bash
# The main job: index SciFact (../shared/data) with the bundled MiniLM, report nDCG@10, run a search.
# Usage: bash scripts/main.sh [DATASET=scifact] [CODEC=int8]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/env.sh"
dataset="${1:-scifact}"
codec="${2:-int8}"
data_dir="${NESTVEC_SHARED:-$repo/../shared}/data/$dataset"
export NESTVEC_DATA="${NESTVEC_DATA:-$repo/nestvec_data}"
name="$dataset-${codec//[^A-Za-z0-9]/_}"
nestvec drop "$name" 2>/dev/null || true
nestvec ingest "$data_dir/corpus.jsonl" --collection "$name" --codec "$codec"
nestvec info "$name"
nestvec eval "$name" --queries "$data_dir/queries.jsonl" --qrels "$data_dir/qrels/test.tsv"
query="$(head -n 1 "$data_dir/queries.jsonl" | python -c 'import json,sys; print(json.load(sys.stdin)["text"])')"
echo "search: $query"
nestvec search "$name" "$query" -k 5
