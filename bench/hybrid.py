"""Dense, lexical and hybrid search quality on SciFact and Cranfield: nDCG@10 and recall@100 per
mode (test qrels; shipped MiniLM vectors for documents and queries, default int8 codec; BM25 from
the collection's tantivy index), and p50 latency per query of each mode. Writes
<out>/hybrid.json and <out>/hybrid.png.

    python bench/hybrid.py [--datasets scifact:train:text,...] [--wiki-passages 150000] [--out bench/results]

A dataset is `name:split:text` where split names the qrels and text is what BM25 indexes: `text`
(title and abstract, as the dense side) or `title` (a far weaker lexical side, to see what a fusion
costs when one side is poor). The defaults were chosen on SciFact's train queries; test queries only
report. Also times the lexical index build over the first 150,000 wiki250k passages.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import nestvec
from nestvec.datasets import Document, iter_corpus, load_qrels, load_queries
from nestvec.evaluation import evaluate
from nestvec.index.fusion import DEFAULT_ALPHA, DEFAULT_FUSION, DEFAULT_RRF_K
from nestvec.index.lexical import LexicalIndex

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


def _titles(path: Path) -> Iterator[Document]:
    """The corpus with only its titles as text: a lexical side far weaker than the dense one (whose
    shipped vectors embed title and abstract), the case where a blind fusion drags results down."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            yield Document(str(row["_id"]), row.get("title") or "")


def run(name: str, folder: Path, split: str = "test", lexical_text: str = "text") -> list[dict[str, Any]]:
    emb = load_shipped(folder)
    corpus = _titles(folder / "corpus.jsonl") if lexical_text == "title" else iter_corpus(folder / "corpus.jsonl")
    docs = {d.id: d for d in corpus}
    qrels = load_qrels(folder / "qrels" / f"{split}.tsv")
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
        for label, kwargs in MODES:
            hits = col.search_batch(texts, k=100, vectors=qvecs, **kwargs)
            run_ = {q: [h.id for h in row] for q, row in zip(qids, hits, strict=True)}
            metrics = evaluate(run_, {q: qrels[q] for q in qids})
            times = []
            for text, vector in zip(texts[:100], qvecs, strict=False):
                start = time.perf_counter()
                col.search(text, k=10, vector=vector, **kwargs)
                times.append(time.perf_counter() - start)
            rows.append({"dataset": name, "split": split, "lexical_text": lexical_text, "setting": label, **kwargs,
                         "ndcg@10": round(metrics["ndcg@10"], 4), "recall@100": round(metrics["recall@100"], 4),
                         "p50_ms": round(1000 * float(np.median(times)), 3)})
            print(f"[{name}/{split}/{lexical_text}] {label:<16} nDCG@10 {metrics['ndcg@10']:.4f}  "
                  f"recall@100 {metrics['recall@100']:.4f}  p50 {rows[-1]['p50_ms']:.2f} ms", flush=True)
        client.close()
    return rows


def lexical_build(limit: int) -> dict[str, Any]:
    """Time and disk size of the lexical index over the first `limit` wiki250k passages, staged and
    committed in batches of 10,000 as a bulk ingest does."""
    texts = (d.text for d in iter_corpus(shared_data() / "wiki250k" / "passages.jsonl.gz"))
    with tempfile.TemporaryDirectory() as tmp:
        index = LexicalIndex(Path(tmp) / "lexical")
        start, done, batch = time.perf_counter(), 0, []
        for text in tqdm(itertools.islice(texts, limit), total=limit, desc="lexical build", unit="doc"):
            batch.append((str(done), text))
            done += 1
            if len(batch) == 10_000:
                index.stage(batch, [])
                index.commit(done)
                batch = []
        if batch:
            index.stage(batch, [])
            index.commit(done)
        index.settle()
        seconds = time.perf_counter() - start
        size = index.disk_bytes()
        index.close()
    result = {"passages": done, "seconds": round(seconds, 1), "docs_per_s": round(done / seconds),
              "disk_mb": round(size / 1e6, 1), "note": "includes reading and gunzipping passages.jsonl.gz"}
    print(f"lexical index of {done} wiki250k passages: {seconds:.1f} s, {size / 1e6:.1f} MB on disk")
    return result


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per (dataset, split, text BM25 sees): nDCG@10 of each mode, the default fusion in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["dataset"], r["split"], r["lexical_text"]) for r in rows))
    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    for ax, (name, split, lexical_text) in zip(axes.flat, groups, strict=False):
        mine = [r for r in rows if (r["dataset"], r["split"], r["lexical_text"]) == (name, split, lexical_text)]
        default = f"weighted a={DEFAULT_ALPHA}" if DEFAULT_FUSION == "weighted" else f"rrf k={DEFAULT_RRF_K}"
        colors = ["C0" if r["setting"] == "dense" else "C1" if r["setting"] == "lexical" else
                  "C3" if r["setting"] == default else "C2" for r in mine]
        ax.barh([r["setting"] for r in mine], [r["ndcg@10"] for r in mine], color=colors)
        ax.axvline(next(r["ndcg@10"] for r in mine if r["setting"] == "dense"), color="C0", ls="--", lw=1)
        ax.set(title=f"{name} {split} queries, BM25 on {lexical_text}s", xlabel="nDCG@10")
        ax.set_xlim(0.2 if name == "cranfield" else 0.35, None)
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle("nestvec search modes (red: the default fusion; dashed: dense alone)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(
        f"{d}:{t}" for d in ("scifact:train", "scifact:test", "cranfield:test") for t in ("text", "title")))
    parser.add_argument("--wiki-passages", type=int, default=150_000,
                        help="build a lexical index of this many wiki250k passages (0: skip)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    rows = []
    for spec in filter(None, args.datasets.split(",")):
        name, *rest = spec.split(":")
        split, lexical_text = (rest + ["test", "text"][len(rest):])[:2]
        rows += run(name, shared_data() / name, split, lexical_text)
    build = lexical_build(args.wiki_passages) if args.wiki_passages else None
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"metadata": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                           "vectors": "shipped all-MiniLM-L6-v2, int8 codec, flat index",
                           "lexical": "tantivy en_stem BM25", "depth": "top-100 of each side fused",
                           "latency": "p50 of 100 single searches, k=10"},
              "rows": rows, "wiki250k_lexical_build": build}
    (args.out / "hybrid.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(rows, args.out / "hybrid.png")
    print(f"wrote {args.out / 'hybrid.json'} and {args.out / 'hybrid.png'}")


if __name__ == "__main__":
    main()
