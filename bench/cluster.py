"""Sharded collections on a local Ray instance: the 150,000 wiki250k MiniLM embeddings in 1, 2
and 4 shards with one and two replicas (default codec int8, index auto: SPANN per shard), against
one unsharded collection holding the same vectors. Recall@10 against the exact top-100, single-query
latency (p50 / p99, one query at a time, as a client sees it through the front door) and QPS, and
batched search (SearchBatch of 100 queries: one batched call per shard) latency and QPS. The
fan-out cost is the sharded figure minus the unsharded one. Writes JSON and a plot.

    python bench/cluster.py [--n 150000] [--queries 1000] [--layouts 1x1,2x1,4x1,1x2,2x2,4x2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import nestvec
from nestvec.catalog import Catalog
from nestvec.cluster.ray_backend import RayBackend

try:
    from bench.compression import shared_data
except ImportError:  # run as a script: bench/ is sys.path[0]
    from compression import shared_data  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
BATCH = 100


def load(n: int, queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder = shared_data() / "wiki250k"
    corpus = np.asarray(np.load(folder / "minilm_base150k_fp16.npy", mmap_mode="r")[:n], dtype=np.float32)
    q = np.asarray(np.load(folder / "minilm_queries_fp16.npy")[:queries], dtype=np.float32)
    truth = np.load(folder / "gt_top100_ids.npy")[:queries]
    return corpus, q, truth


def fill(col: Any, corpus: np.ndarray, label: str) -> float:
    ids = [str(i) for i in range(len(corpus))]
    start = time.perf_counter()
    for lo in tqdm(range(0, len(corpus), 4096), desc=f"upsert {label}", unit="batch"):
        col.upsert(ids[lo:lo + 4096], vectors=corpus[lo:lo + 4096])
    col.flush_index()
    return time.perf_counter() - start


def measure(col: Any, queries: np.ndarray, truth: np.ndarray, label: str) -> dict[str, Any]:
    col.search(queries[0], k=10)  # warm
    latencies, found = [], []
    for q in tqdm(queries, desc=f"single queries {label}", unit="q"):
        start = time.perf_counter()
        hits = col.search(q, k=10)
        latencies.append(time.perf_counter() - start)
        found.append([int(h.id) for h in hits])
    recall = float(np.mean([len(set(f) & set(t[:10].tolist())) / 10 for f, t in zip(found, truth, strict=True)]))
    batch_s = []
    for lo in range(0, len(queries), BATCH):
        start = time.perf_counter()
        col.search_batch(queries[lo:lo + BATCH], k=10)
        batch_s.append(time.perf_counter() - start)
    ms = 1000 * np.array(latencies)
    return {"recall@10": round(recall, 4), "single_p50_ms": round(float(np.percentile(ms, 50)), 2),
            "single_p99_ms": round(float(np.percentile(ms, 99)), 2), "single_qps": round(len(ms) / ms.sum() * 1000, 1),
            "batch_p50_ms": round(1000 * float(np.median(batch_s)), 1),
            "batch_qps": round(len(queries) / float(np.sum(batch_s)), 1)}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = [r["layout"] for r in runs]
    x = np.arange(len(runs))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].bar(x - 0.2, [r["single_p50_ms"] for r in runs], 0.4, label="p50")
    axes[0].bar(x + 0.2, [r["single_p99_ms"] for r in runs], 0.4, label="p99")
    axes[0].set(ylabel="ms", title="one query at a time: latency")
    axes[1].bar(x - 0.2, [r["single_qps"] for r in runs], 0.4, label="single queries")
    axes[1].bar(x + 0.2, [r["batch_qps"] for r in runs], 0.4, label=f"batches of {BATCH}")
    axes[1].set(ylabel="queries / s", title="throughput")
    axes[2].bar(x, [r["recall@10"] for r in runs], color="C2")
    axes[2].set(ylim=(min(r["recall@10"] for r in runs) - 0.05, 1.0), title="recall@10 (exact top-10)")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"wiki250k, {result['metadata']['vectors']:,} MiniLM vectors, int8, SPANN per shard; "
                 f"shards x replicas on one {result['metadata']['cpus']}-core machine (local Ray)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=150_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--layouts", default="1x1,2x1,4x1,1x2,2x2,4x2", help="shards x replicas, comma-separated")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    corpus, queries, truth = load(args.n, args.queries)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        single = nestvec.connect(Path(tmp) / "single").create_collection("wiki", encoder=None, dim=corpus.shape[1])
        seconds = fill(single, corpus, "unsharded")
        base = {"layout": "unsharded", "shards": 0, "replicas": 0, "ingest_s": round(seconds, 1),
                **measure(single, queries, truth, "unsharded"), "index": single.info()["index"]["kind"],
                "disk_mb": round(single.info()["disk_bytes"] / 1e6, 1)}
        runs.append(base)
        print(json.dumps(base), flush=True)
        backend = RayBackend("local")
        catalog = Catalog(Path(tmp) / "sharded", cluster=backend)
        for layout in args.layouts.split(","):
            shards, replicas = (int(v) for v in layout.split("x"))
            col = catalog.create_collection(f"wiki-{layout}", encoder=None, dim=corpus.shape[1], shards=shards,
                                            replicas=replicas)
            seconds = fill(col, corpus, layout)
            row = {"layout": f"{shards} shards x {replicas}", "shards": shards, "replicas": replicas,
                   "ingest_s": round(seconds, 1), **measure(col, queries, truth, layout)}
            members = col.info()["cluster"]["members"]
            row["index"] = sorted({m.get("index", "?") for m in members})
            row["vectors_per_shard"] = [m["count"] for m in members if m["replica"] == 0]
            row["replica_rss_mb"] = [m.get("rss_mb") for m in members]
            row["replica_disk_mb"] = [round(m.get("disk_bytes", 0) / 1e6, 1) for m in members]
            for key in ("single_p50_ms", "batch_p50_ms"):
                row[f"fan_out_{key}"] = round(row[key] - base[key], 2)
            runs.append(row)
            print(json.dumps(row), flush=True)
            catalog.drop_collection(f"wiki-{layout}")
        catalog.close()
    result = {"metadata": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                           "vectors": args.n, "queries": args.queries, "batch": BATCH,
                           "codec": "int8 (default)", "index": "auto (SPANN from 20,000 per shard)",
                           "client": "in-process front door (DistributedCollection); replicas are Ray actors"},
              "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(result, args.out / "cluster.png")
    print("| layout | recall@10 | single p50 ms | p99 ms | single QPS | batch-100 p50 ms | batch QPS | ingest s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['layout']} | {r['recall@10']} | {r['single_p50_ms']} | {r['single_p99_ms']} | {r['single_qps']} "
              f"| {r['batch_p50_ms']} | {r['batch_qps']} | {r['ingest_s']} |")


if __name__ == "__main__":
    main()
