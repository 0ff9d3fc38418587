"""Live updates on the SPANN index, through the collection API, on wiki250k's real vectors.

Builds a collection on the first 120,000 of the 150,000 MiniLM passage vectors, then inserts the
other 30,000 live (batches of 1,000: write buffer, flushes, list splits) and deletes 15,000 (purges,
merges), and compares recall@10 of the 1,000 real queries at the same settings with a fresh build
on the same final set, against the exact top-10 of that set (fp32 brute force). Also checks that no
deleted id is ever returned. Writes bench/results/live.json.

    python bench/live.py [--base 120000] [--insert 30000] [--delete 15000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def wiki() -> Path:
    root = os.environ.get("NESTVEC_SHARED")
    return (Path(root) if root else REPO.parent / "shared") / "data" / "wiki250k"


def recall_at_10(found: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=120_000)
    parser.add_argument("--insert", type=int, default=30_000)
    parser.add_argument("--delete", type=int, default=15_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    import faiss

    import nestvec

    faiss.omp_set_num_threads(1)
    total = args.base + args.insert
    vectors = np.load(wiki() / "minilm_base150k_fp16.npy")[:total].astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = np.load(wiki() / "minilm_queries_fp16.npy").astype(np.float32)
    ids = [f"p{i}" for i in range(total)]
    deleted = sorted(np.random.default_rng(0).choice(total, args.delete, replace=False).tolist())
    final = np.setdiff1d(np.arange(total), deleted)
    _, exact_rows = faiss.knn(queries, vectors[final], 10, metric=faiss.METRIC_INNER_PRODUCT)
    exact = [[ids[final[r]] for r in row] for row in exact_rows.tolist()]
    gone = {ids[i] for i in deleted}
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as folder:
        client = nestvec.connect(folder)
        live = client.create_collection("live", encoder=None, dim=384, index="spann")
        start = time.perf_counter()
        for lo in range(0, args.base, 10_000):
            live.upsert(ids[lo:min(lo + 10_000, args.base)], vectors=vectors[lo:min(lo + 10_000, args.base)])
        live.rebuild_index()
        report["build_s"] = time.perf_counter() - start
        lists_before = live.info()["index"]["lists"]
        start = time.perf_counter()
        for lo in range(args.base, total, args.batch):
            live.upsert(ids[lo:lo + args.batch], vectors=vectors[lo:lo + args.batch])
        report["insert_s"] = time.perf_counter() - start
        start = time.perf_counter()
        for lo in range(0, len(deleted), args.batch):
            live.delete([ids[i] for i in deleted[lo:lo + args.batch]])
        report["delete_s"] = time.perf_counter() - start
        report["live_index"] = {**live.info()["index"], "lists_before_updates": lists_before}
        found_live = [[h.id for h in hits] for hits in live.search_batch(queries, 10)]
        single_live = [[h.id for h in live.search(q, 10)] for q in queries[:200]]

        fresh = client.create_collection("fresh", encoder=None, dim=384, index="spann")
        for lo in range(0, len(final), 10_000):
            part = final[lo:lo + 10_000]
            fresh.upsert([ids[i] for i in part], vectors=vectors[part])
        fresh.rebuild_index()
        report["fresh_index"] = fresh.info()["index"]
        found_fresh = [[h.id for h in hits] for hits in fresh.search_batch(queries, 10)]
        client.close()

    returned_deleted = sum(len(gone & set(row)) for row in found_live + single_live)
    report.update({
        "recall@10_live": recall_at_10(found_live, exact), "recall@10_fresh": recall_at_10(found_fresh, exact),
        "recall@10_live_single_query_first200": recall_at_10(single_live, exact[:200]),
        "deleted_ids_returned": returned_deleted,
    })
    report["recall_gap"] = float(report["recall@10_fresh"]) - float(report["recall@10_live"])  # type: ignore[arg-type]
    report["metadata"] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "base": args.base,
                          "inserted": args.insert, "deleted": args.delete, "batch": args.batch, "codec": "int8",
                          "queries": len(queries), "cpus": os.cpu_count()}
    for key in ("recall@10_live", "recall@10_fresh", "recall_gap", "deleted_ids_returned", "build_s", "insert_s",
                "delete_s"):
        print(f"{key:>22}: {report[key]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "live.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out / 'live.json'}")


if __name__ == "__main__":
    main()
