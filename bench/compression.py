"""Codec quality vs size: nDCG@10 / recall@100 per codec on SciFact and Cranfield (test qrels).

Every codec is fitted on the same seeded sample of corpus vectors, encodes the whole corpus and is
searched exactly (FlatIndex, k=100). `binary+rescore` scans sign bits, then re-ranks the top 100 by
the fp32 codes kept for rescoring. Writes <out>/compression.json and <out>/compression.png.

    python bench/compression.py [--datasets scifact,cranfield] [--encode] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nestvec.compression import Codec, make_codec
from nestvec.datasets import iter_corpus, load_qrels, load_queries
from nestvec.encoders.st import Precision
from nestvec.evaluation import evaluate
from nestvec.index.flat import FlatIndex
from nestvec.index.topk import rerank

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "embeddings"
DIM = 384
K = 100
FIT_SAMPLE = 4096
SEED = 0
RESCORE_DEPTH = 100
TIMING_REPEATS = 5
# (label, spec); "binary+rescore" is searched in two stages, see search_rescored().
CODECS: list[tuple[str, str]] = [
    ("fp32", "fp32"),
    ("fp16", "fp16"),
    ("fp8", "fp8"),
    ("fp8e5m2", "fp8e5m2"),
    ("int8", "int8"),
    ("binary", "binary"),
    ("binary+rescore@100", "binary+rescore"),
    ("pca50%+fp8", "pca50%+fp8"),
    ("pca25%+fp8", "pca25%+fp8"),
    ("mrl50%+fp8", "mrl50%+fp8"),
]


def shared_data() -> Path:
    """The shared data folder: $NESTVEC_SHARED/data, else <repo>/../shared/data."""
    root = os.environ.get("NESTVEC_SHARED")
    return Path(root) / "data" if root else REPO.parent / "shared" / "data"


@dataclass
class Embeddings:
    corpus: np.ndarray
    corpus_ids: list[str]
    queries: np.ndarray
    query_ids: list[str]
    source: str


def _read_ids(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def load_shipped(folder: Path) -> Embeddings:
    """The precomputed all-MiniLM-L6-v2 embeddings shipped with a dataset (<folder>/minilm)."""
    m = folder / "minilm"
    return Embeddings(np.load(m / "corpus.npy"), _read_ids(m / "corpus_ids.txt"),
                      np.load(m / "queries.npy"), _read_ids(m / "queries_ids.txt"), f"shipped:{folder.name}/minilm")


def encode_cached(folder: Path, precision: Precision = "fp32") -> Embeddings:
    """Encode corpus and all queries with the real encoder; cached under <repo>/.cache/embeddings/."""
    name = folder.name
    path = CACHE / f"{name}-all-MiniLM-L6-v2-{precision}.npz"
    stamp = np.array([(folder / f).stat().st_size for f in ("corpus.jsonl", "queries.jsonl")])
    source = f"encoded:all-MiniLM-L6-v2:{precision}"
    if path.exists():
        z = np.load(path)
        if np.array_equal(z["stamp"], stamp):
            print(f"[{name}] embeddings from cache {path}")
            return Embeddings(z["corpus"], z["corpus_ids"].tolist(), z["queries"], z["query_ids"].tolist(),
                              source + f" (cache {path.relative_to(REPO)})")
    from nestvec.encoders import SentenceTransformerEncoder

    encoder = SentenceTransformerEncoder(precision=precision)
    docs = list(iter_corpus(folder / "corpus.jsonl"))
    queries = load_queries(folder / "queries.jsonl")
    print(f"[{name}] encoding {len(docs)} docs + {len(queries)} queries ({precision}) ...")
    corpus = encoder.encode([d.text for d in docs], kind="document", show_progress=True)
    qvecs = encoder.encode(list(queries.values()), kind="query", show_progress=False)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, corpus=corpus, corpus_ids=np.array([d.id for d in docs]), queries=qvecs,
             query_ids=np.array(list(queries)), stamp=stamp)
    tmp.replace(path)
    return Embeddings(corpus, [d.id for d in docs], qvecs, list(queries), source)


def fit_sample(corpus: np.ndarray, size: int = FIT_SAMPLE, seed: int = SEED) -> np.ndarray:
    """A seeded random sample (without replacement, in corpus order) of up to `size` rows."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(corpus), size=min(size, len(corpus)), replace=False))
    return corpus[rows]


def search_rescored(codec: Codec, index: FlatIndex, rescore_codes: np.ndarray, queries: np.ndarray,
                    depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Scan the codec's codes for `depth` candidates, re-rank them by the decoded rescoring codes."""
    assert codec.rescore is not None
    _, rows = index.search(queries, depth)
    candidates = rescore_codes[np.where(rows >= 0, rows, 0)]
    return rerank(codec.rescore.candidate_scores(queries, candidates), rows, depth)


@dataclass
class Row:
    dataset: str
    codec: str
    spec: str
    ndcg10: float
    recall100: float
    bytes_per_vector: int
    stored_bytes_per_vector: int
    compression: float
    stored_compression: float
    ndcg_change_pct: float
    search_ms_per_query: float
    fit_s: float
    encode_s: float


def run_dataset(name: str, emb: Embeddings, qrels: dict[str, dict[str, int]]) -> list[Row]:
    """All codecs on one dataset; queries are the qrels' query ids."""
    qpos = {qid: i for i, qid in enumerate(emb.query_ids)}
    missing = [q for q in qrels if q not in qpos]
    if missing:
        raise SystemExit(f"[{name}] {len(missing)} qrels queries have no embedding, e.g. {missing[:3]}")
    qids = list(qrels)
    queries = np.ascontiguousarray(emb.queries[[qpos[q] for q in qids]], dtype=np.float32)
    corpus = np.ascontiguousarray(emb.corpus, dtype=np.float32)
    doc_ids = np.asarray(emb.corpus_ids)
    sample = fit_sample(corpus)
    fp32_bytes = make_codec("fp32", DIM).bytes_per_vector
    rows: list[Row] = []
    for label, spec in CODECS:
        t0 = time.perf_counter()
        codec = make_codec(spec, corpus.shape[1]).fit(sample)
        t1 = time.perf_counter()
        index = FlatIndex(codec)
        index.append(codec.encode(corpus))
        rescore_codes = codec.rescore.encode(corpus) if codec.rescore is not None else None
        t2 = time.perf_counter()
        best = float("inf")
        for _ in range(TIMING_REPEATS):
            start = time.perf_counter()
            if rescore_codes is not None:
                _, hits = search_rescored(codec, index, rescore_codes, queries, RESCORE_DEPTH)
            else:
                _, hits = index.search(queries, K)
            best = min(best, time.perf_counter() - start)
        run = {qid: [str(d) for d in doc_ids[r[r >= 0]]] for qid, r in zip(qids, hits, strict=True)}
        metrics = evaluate(run, qrels)
        rows.append(Row(
            dataset=name, codec=label, spec=codec.spec, ndcg10=metrics["ndcg@10"], recall100=metrics["recall@100"],
            bytes_per_vector=codec.bytes_per_vector, stored_bytes_per_vector=codec.stored_bytes_per_vector,
            compression=fp32_bytes / codec.bytes_per_vector,
            stored_compression=fp32_bytes / codec.stored_bytes_per_vector,
            ndcg_change_pct=float("nan"), search_ms_per_query=1000.0 * best / len(qids),
            fit_s=t1 - t0, encode_s=t2 - t1,
        ))
    base = next(r.ndcg10 for r in rows if r.codec == "fp32")
    for r in rows:
        r.ndcg_change_pct = 100.0 * (r.ndcg10 - base) / base
    return rows


def print_table(name: str, rows: list[Row], n_docs: int, n_queries: int) -> None:
    print(f"\n{name}: {n_docs} docs, {n_queries} test queries, k={K}")
    header = (f"{'codec':<20} {'spec':<20} {'nDCG@10':>8} {'R@100':>7} {'B/vec':>6} {'stored':>7} "
              f"{'ratio':>6} {'dnDCG%':>7} {'ms/q':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.codec:<20} {r.spec:<20} {r.ndcg10:>8.4f} {r.recall100:>7.4f} {r.bytes_per_vector:>6d} "
              f"{r.stored_bytes_per_vector:>7d} {r.compression:>5.1f}x {r.ndcg_change_pct:>+7.2f} "
              f"{r.search_ms_per_query:>7.3f}")


def plot(rows: list[Row], datasets: list[str], path: Path) -> None:
    """nDCG@10 vs scanned bytes per vector (log x), one subplot per dataset, points labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 5.5), squeeze=False)
    for ax, name in zip(axes[0], datasets, strict=True):
        sub = [r for r in rows if r.dataset == name]
        ax.scatter([r.bytes_per_vector for r in sub], [r.ndcg10 for r in sub], zorder=3)
        # Points at the same size whose nDCG is within 5% of the axis span share one label.
        span = max(r.ndcg10 for r in sub) - min(r.ndcg10 for r in sub) or 1.0
        clusters: list[list[Row]] = []
        for r in sorted(sub, key=lambda r: (r.bytes_per_vector, -r.ndcg10)):
            last = clusters[-1][-1] if clusters else None
            if last and last.bytes_per_vector == r.bytes_per_vector and last.ndcg10 - r.ndcg10 < 0.05 * span:
                clusters[-1].append(r)
            else:
                clusters.append([r])
        for group in clusters:
            y = float(np.mean([r.ndcg10 for r in group]))
            ax.annotate("\n".join(r.codec for r in group), (group[0].bytes_per_vector, y),
                        xytext=(6, 0), textcoords="offset points", fontsize=8, va="center")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per vector scanned (log)")
        ax.set_ylabel("nDCG@10")
        ax.set_title(f"{name} (all-MiniLM-L6-v2, 384-d)")
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.15, y=0.1)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="scifact,cranfield", help="comma-separated folders of shared/data")
    parser.add_argument("--encode", action="store_true",
                        help="encode with the real encoder (fp32, cached in .cache/embeddings) instead of shipped")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    data = shared_data()
    rows: list[Row] = []
    meta: dict[str, object] = {}
    for name in datasets:
        folder = data / name
        emb = encode_cached(folder) if args.encode else load_shipped(folder)
        qrels = load_qrels(folder / "qrels" / "test.tsv")
        sub = run_dataset(name, emb, qrels)
        print_table(name, sub, len(emb.corpus_ids), len(qrels))
        rows += sub
        meta[name] = {"docs": len(emb.corpus_ids), "queries_embedded": len(emb.query_ids),
                      "test_queries": len(qrels), "embedding_source": emb.source}
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "metadata": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "embedding_source": "encoded" if args.encode else "shipped",
            "model": "all-MiniLM-L6-v2", "dim": DIM, "k": K, "fit_sample": FIT_SAMPLE, "seed": SEED,
            "rescore_depth": RESCORE_DEPTH, "qrels": "test",
            "search_timing": f"FlatIndex over all test queries in one batch, best of {TIMING_REPEATS}, per query",
            "datasets": meta, "python": platform.python_version(), "numpy": np.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(),
        },
        "rows": [asdict(r) for r in rows],
    }
    json_path, png_path = args.out / "compression.json", args.out / "compression.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(rows, datasets, png_path)
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
