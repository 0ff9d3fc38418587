"""Parts of the torture harness (`python bench/torture.py PART`), one module each.

Every part module defines NAME (the CLI subcommand and its key in bench/results/torture.json),
`add_arguments(parser)` and `run(args) -> dict`: a JSON-able result holding at least
"passed" (bool) and "seconds". A part may define `plot(result, ax)` to draw its panel.
The short versions in tests/torture/ call the same functions with small arguments.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def part_args(part: ModuleType, **overrides: object) -> argparse.Namespace:
    """A part's default arguments with some replaced (the short test versions, `torture.py all`)."""
    parser = argparse.ArgumentParser()
    part.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def scifact_folder() -> Path:
    """SciFact and its shipped MiniLM vectors in ../shared (or $NESTVEC_SHARED)."""
    root = os.environ.get("NESTVEC_SHARED")
    return (Path(root) if root else REPO.parent / "shared") / "data" / "scifact"
