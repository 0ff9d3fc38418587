"""Torture harness: crash consistency, disk full, API fuzzing, soak and auth over the whole store.

Each part proves one promise of nestvec (an acknowledged write survives any crash, a delete never
comes back, bad input changes nothing, no key means no access) and reports figures. Results merge
into bench/results/torture.json (one key per part) with a plot, torture.png.

    python bench/torture.py crash --trials 20        # SIGKILL a live workload, reopen, check
    python bench/torture.py disk                     # a full filesystem under a collection
    python bench/torture.py fuzz --cases 5000        # random and malformed gRPC requests
    python bench/torture.py soak --minutes 10        # 8 clients, 200 searches/s + writes
    python bench/torture.py auth                     # every RPC without / with a wrong key
    python bench/torture.py all                      # every part with its defaults
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.tortures import part_args  # noqa: E402  (after the path is set)

PARTS = ("crash", "disk", "fuzz", "soak", "auth")


def load_part(name: str) -> ModuleType:
    return importlib.import_module(f"bench.tortures.{name}")


def merge_result(out: Path, name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Store one part's result beside the others' (each run replaces only its own part)."""
    path = out / "torture.json"
    merged: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    merged[name] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **result}
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(path)
    return merged


def plot(merged: dict[str, Any], path: Path) -> None:
    """One panel per part that knows how to draw itself."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawable = [(name, load_part(name)) for name in PARTS if name in merged]
    drawable = [(name, part) for name, part in drawable if hasattr(part, "plot")]
    if not drawable:
        return
    fig, axes = plt.subplots(1, len(drawable), figsize=(5.5 * len(drawable), 4.2), squeeze=False)
    for ax, (name, part) in zip(axes[0], drawable, strict=True):
        part.plot(merged[name], ax)
        ax.set_title(f"{name}: {'passed' if merged[name].get('passed') else 'FAILED'}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    sub = parser.add_subparsers(dest="part", required=True)
    for name in PARTS:
        part = load_part(name)
        part.add_arguments(sub.add_parser(name, help=(part.__doc__ or "").strip().splitlines()[0]))
    every = sub.add_parser("all", help="every part with its default arguments")
    every.set_defaults(all=True)
    args = parser.parse_args(argv)
    names = list(PARTS) if getattr(args, "all", False) else [args.part]
    passed = True
    for name in names:
        part = load_part(name)
        started = time.perf_counter()
        result = part.run(part_args(part) if getattr(args, "all", False) else args)
        result.setdefault("seconds", round(time.perf_counter() - started, 1))
        merged = merge_result(args.out, name, result)
        print(json.dumps({name: result}, indent=2, default=str)[:4000], flush=True)
        passed = passed and bool(result.get("passed"))
    plot(merged, args.out / "torture.png")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
