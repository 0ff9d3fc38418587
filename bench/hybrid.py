"""Dense, lexical and hybrid search quality on SciFact and Cranfield: nDCG@10 and recall@100 per
mode (test qrels; shipped MiniLM vectors for documents and queries, default int8 codec; BM25 from
the collection's tantivy index), and p50 latency per query of each mode. Writes
<out>/hybrid.json and <out>/hybrid.png.

    python bench/hybrid.py [--datasets scifact,cranfield] [--out bench/results]
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

import nestvec
from nestvec.datasets import iter_corpus, load_qrels, load_queries
from nestvec.evaluation import evaluate

try:
    from bench.compression import load_shipped, shared_data
except ImportError:  # run as a script: bench/ is sys.path[0]
    from compression import load_shipped, shared_data  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
# (label, search keywords)
MODES: list[tuple[str, dict[str, Any]]] = [
    ("dense", {"mode": "dense"}),
    ("lexical", {"mode": "lexical"}),
    *[(f"rrf k={k}", {"mode": "hybrid", "fusion": "rrf", "rrf_k": k}) for k in (10, 30, 60, 100)],
    *[(f"weighted a={a}", {"mode": "hybrid", "fusion": "weighted", "alpha": a}) for a in (0.1, 0.3, 0.5, 0.7, 0.9)],
]


def run(name: str, folder: Path) -> list[dict[str, Any]]:
    emb = load_shipped(folder)
    docs = {d.id: d for d in iter_corpus(folder / "corpus.jsonl")}
    qrels = load_qrels(folder / "qrels" / "test.tsv")
    queries = load_queries(folder / "queries.jsonl")
    qrow = {q: i for i, q in enumerate(emb.query_ids)}
    qids = [q for q in qrels if q in qrow and q in queries]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        client = nestvec.connect(tmp)
        col = client.create_collection(name, encoder=None, dim=emb.corpus.shape[1], codec="int8")
        for lo in range(0, len(emb.corpus_ids), 1024):
            ids = emb.corpus_ids[lo:lo + 1024]
            col.upsert(ids, vectors=emb.corpus[lo:lo + 1024], texts=[docs[i].text for i in ids])
        qvecs = np.ascontiguousarray(emb.queries[[qrow[q] for q in qids]], dtype=np.float32)
        texts = [queries[q] for q in qids]
        # hybrid needs the query text and its vector: the collection has no encoder, so the shipped
        # query vectors are passed through embed_queries, as a server-side encoder would make them
        lookup = {t: v for t, v in zip(texts, qvecs, strict=True)}
        col.embed_queries = lambda qs, model=None: np.stack([lookup[q] for q in qs])  # type: ignore[method-assign]
        for label, kwargs in MODES:
            hits = col.search_batch(texts, k=100, **kwargs)
            run_ = {q: [h.id for h in row] for q, row in zip(qids, hits, strict=True)}
            metrics = evaluate(run_, {q: qrels[q] for q in qids})
            times = []
            for text in texts[:100]:
                start = time.perf_counter()
                col.search(text, k=10, **kwargs)
                times.append(time.perf_counter() - start)
            rows.append({"dataset": name, "mode": label, **kwargs, "ndcg@10": round(metrics["ndcg@10"], 4),
                         "recall@100": round(metrics["recall@100"], 4),
                         "p50_ms": round(1000 * float(np.median(times)), 3)})
            print(f"[{name}] {label:<16} nDCG@10 {metrics['ndcg@10']:.4f}  recall@100 {metrics['recall@100']:.4f}  "
                  f"p50 {rows[-1]['p50_ms']:.2f} ms", flush=True)
        client.close()
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, name in zip(axes[0], datasets, strict=True):
        mine = [r for r in rows if r["dataset"] == name]
        colors = ["C0" if r["mode"] == "dense" else "C1" if r["mode"] == "lexical" else "C2" for r in mine]
        ax.barh([r["mode"] for r in mine], [r["ndcg@10"] for r in mine], color=colors)
        dense = next(r["ndcg@10"] for r in mine if r["mode"] == "dense")
        ax.axvline(dense, color="C0", ls="--", lw=1)
        ax.set(title=f"{name}: nDCG@10 per search mode", xlabel="nDCG@10")
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="scifact,cranfield")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    rows = [row for name in args.datasets.split(",") if name for row in run(name, shared_data() / name)]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"metadata": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                           "vectors": "shipped all-MiniLM-L6-v2, int8 codec, flat index",
                           "lexical": "tantivy en_stem BM25", "depth": "top-100 of each side fused",
                           "latency": "p50 of 100 single searches, k=10"},
              "rows": rows}
    (args.out / "hybrid.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(rows, args.out / "hybrid.png")
    print(f"wrote {args.out / 'hybrid.json'} and {args.out / 'hybrid.png'}")


if __name__ == "__main__":
    main()
