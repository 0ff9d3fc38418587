"""Bulk ingest of wiki250k with its precomputed MiniLM embeddings (`nestvec ingest --vectors`, no
encoding): docs/s, peak resident and peak anonymous memory at several corpus sizes, each a fresh
`nestvec ingest` process into a fresh folder. Writes JSON and a PNG.

    python bench/ingest.py [--sizes 50000,150000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    root = os.environ.get("NESTVEC_SHARED")
    return (Path(root) if root else REPO.parent / "shared") / "data" / "wiki250k"


def run(size: int, batch: int) -> dict[str, Any]:
    data = shared_data()
    with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").exists() else None) as folder:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "nestvec.cli", "--data", folder, "ingest",
                               str(data / "passages.jsonl.gz"), "--collection", "wiki", "--vectors",
                               str(data / "minilm_base150k_fp16.npy"), "--limit", str(size), "--batch-size",
                               str(batch), "--no-progress"], check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return {"size": size, "process_wall_s": round(wall, 2), **summary}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(sizes, [r["docs_per_second"] for r in rows], "o-")
    left.set(xlabel="documents", ylabel="docs / s", title="ingest throughput (--vectors)", ylim=(0, None))
    right.plot(sizes, [r["peak_anon_mb"] for r in rows], "o-", label="peak anonymous memory")
    right.plot(sizes, [r["peak_rss_mb"] for r in rows], "o--", label="peak RSS (incl. mapped LMDB pages)")
    right.set(xlabel="documents", ylabel="MB", title="memory of the ingest process", ylim=(0, None))
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"nestvec ingest, wiki250k MiniLM vectors, int8, {os.cpu_count()} CPUs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50000,150000")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    rows = []
    for size in (int(s) for s in args.sizes.split(",") if s):
        row = run(size, args.batch)
        rows.append(row)
        print(f"{size:>7} docs: {row['docs_per_second']:8.1f} docs/s  peak anon {row['peak_anon_mb']:6.1f} MB  "
              f"peak RSS {row['peak_rss_mb']:6.1f} MB  disk {row['disk_bytes'] / 1e6:6.1f} MB", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"metadata": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                           "input": "wiki250k passages.jsonl.gz + minilm_base150k_fp16.npy", "batch": args.batch,
                           "codec": "int8 (default)", "index": "auto (SPANN from 20,000)"},
              "runs": rows}
    (args.out / "ingest.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(rows, args.out / "ingest.png")
    print(f"wrote {args.out / 'ingest.json'} and {args.out / 'ingest.png'}")


if __name__ == "__main__":
    main()
