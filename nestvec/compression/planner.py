"""The byte-budget planner behind `nestvec plan`: measure each candidate codec on the user's own
vectors and pick the best one that fits the budget.

Quality is nDCG@10 when labelled queries are given, else a label-free proxy: held-out documents
are the queries, and quality is the recall@10 of search through the codec against the exact
float32 neighbours among the other documents. Arrays in, rows out; the collection and the CLI
decide where the vectors come from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from nestvec.compression.codec import Codec
from nestvec.compression.factory import make_codec
from nestvec.errors import invalid

K = 10
RESCORE_DEPTH = 100
FIT_SAMPLE = 4096
PROXY_QUERIES = 300
SEED = 0


def candidate_specs(dim: int, matryoshka: bool = False) -> list[str]:
    """Every codec the planner weighs for `dim`-dimensional vectors: float and int8 codes of all
    dims, PCA to 1/2, 3/8, 1/4 and 1/8 of the dims with each 8-bit code, Matryoshka prefixes when
    the encoder was trained for them, and binary codes (alone and re-ranked by int8 codes)."""
    specs = ["fp16", "fp8", "fp8e5m2", "int8"]
    dims = sorted({max(1, round(dim * f)) for f in (1 / 2, 3 / 8, 1 / 4, 1 / 8)}, reverse=True)
    for d in dims:
        specs += [f"pca{d}+fp8", f"pca{d}+fp8e5m2", f"pca{d}+int8"]
    if matryoshka:
        specs += [f"mrl{d}+fp8" for d in dims]
    return [*specs, "binary", "binary+rescore:int8"]


@dataclass(frozen=True)
class Labels:
    """Labelled queries: vectors [q, d] and, per query, {doc row: graded relevance}."""

    queries: np.ndarray
    relevant: list[dict[int, int]]


@dataclass
class PlanRow:
    spec: str
    bytes_per_vector: int          # scanned at search time
    stored_bytes_per_vector: int   # scanned + kept for rescoring
    collection_bytes: int          # stored bytes for the whole collection
    quality: float                 # nDCG@10 (labels) or recall@10 against float32 (proxy)
    metric: str
    search_ms_per_query: float     # exact scan through the codec over the evaluated vectors
    fits: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    rows: list[PlanRow]
    budget_bytes_per_vector: float
    recommended: PlanRow | None

    def to_json(self) -> dict[str, Any]:
        return {"budget_bytes_per_vector": self.budget_bytes_per_vector,
                "recommended": self.recommended.spec if self.recommended else None,
                "rows": [r.to_json() for r in self.rows]}

    def table(self) -> str:
        lines = [f"{'codec':<22} {'B/vec':>6} {'stored':>7} {'collection':>11} {self.rows[0].metric:>10} "
                 f"{'ms/query':>9}  fits"]
        for r in self.rows:
            mark = " <- recommended" if self.recommended is r else ""
            lines.append(f"{r.spec:<22} {r.bytes_per_vector:>6} {r.stored_bytes_per_vector:>7} "
                         f"{_size(r.collection_bytes):>11} {r.quality:>10.4f} {r.search_ms_per_query:>9.3f}  "
                         f"{'yes' if r.fits else 'no'}{mark}")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def exact_top(queries: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k largest inner products (the float32 truth); faiss for the scan."""
    import faiss

    _, rows = faiss.knn(np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(base, np.float32), k,
                        metric=faiss.METRIC_INNER_PRODUCT)
    return rows


def search_codes(codec: Codec, codes: np.ndarray, rescore_codes: np.ndarray | None, queries: np.ndarray,
                 k: int, depth: int = RESCORE_DEPTH) -> np.ndarray:
    """Top-k rows of an exact scan through the codec; with rescoring codes, scan for `depth`
    candidates and re-rank them by the rescoring codec."""
    wide = depth if rescore_codes is not None else k
    rows = codec.top_parts(queries, [codes], min(wide, len(codes)))[1]
    if rescore_codes is None:
        return rows
    assert codec.rescore is not None
    scores = codec.rescore.candidate_scores(queries, rescore_codes[np.where(rows >= 0, rows, 0)])
    scores = np.where(rows >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, order, axis=1)


def ndcg_at_10(found: np.ndarray, relevant: Sequence[dict[int, int]]) -> float:
    """Mean nDCG@10 with graded gains (BEIR's definition: gain = relevance, log2 discount)."""
    discounts = 1.0 / np.log2(np.arange(2, K + 2))
    total = 0.0
    for rows, rel in zip(found[:, :K].tolist(), relevant, strict=True):
        gains = np.array([rel.get(r, 0) for r in rows], dtype=np.float64)
        ideal = np.sort(np.array(list(rel.values()), dtype=np.float64))[::-1][:K]
        best = float((ideal * discounts[:len(ideal)]).sum())
        total += float((gains * discounts[:len(gains)]).sum()) / best if best > 0 else 0.0
    return total / max(len(relevant), 1)


def evaluate_codec(spec: str, vectors: np.ndarray, queries: np.ndarray, judge: Callable[[np.ndarray], float],
                   fit_sample: np.ndarray) -> tuple[float, float, Codec]:
    """(quality, scan ms per query, fitted codec) of one candidate."""
    codec = make_codec(spec, vectors.shape[1]).fit(fit_sample)
    codes = codec.encode(vectors)
    rescore_codes = codec.rescore.encode(vectors) if codec.rescore is not None else None
    start = time.perf_counter()
    found = search_codes(codec, codes, rescore_codes, queries, K)
    ms = 1000 * (time.perf_counter() - start) / max(len(queries), 1)
    return judge(found), ms, codec


def plan(vectors: np.ndarray, budget_bytes_per_vector: float, *, collection_size: int | None = None,
         labels: Labels | None = None, specs: Sequence[str] | None = None, matryoshka: bool = False,
         proxy_queries: int = PROXY_QUERIES, seed: int = SEED, progress: bool = True) -> Plan:
    """Measure every candidate on `vectors` (float32 [n, d], a sample of the collection or all of
    it) and recommend the best whose stored bytes per vector fit the budget.

    With `labels`, quality is nDCG@10 of the labelled queries over `vectors` (their rows are what
    `relevant` refers to). Without, `proxy_queries` documents are held out as queries and quality
    is recall@10 against their exact float32 neighbours among the rest."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) < 2 * K:
        raise invalid("vectors", f"need a 2-D array of at least {2 * K} vectors, got shape {vectors.shape}")
    if not np.isfinite(budget_bytes_per_vector) or budget_bytes_per_vector <= 0:
        raise invalid("budget", f"must be a positive number of bytes per vector, got {budget_bytes_per_vector}")
    rng = np.random.default_rng(seed)
    if labels is not None:
        base, queries, metric = vectors, np.ascontiguousarray(labels.queries, np.float32), "ndcg@10"
        relevant = labels.relevant

        def judge(found: np.ndarray) -> float:
            return ndcg_at_10(found, relevant)
    else:
        held = np.zeros(len(vectors), dtype=bool)
        held[rng.choice(len(vectors), min(proxy_queries, len(vectors) // 4), replace=False)] = True
        base, queries, metric = vectors[~held], vectors[held], "recall@10"
        truth = exact_top(queries, base, K)

        def judge(found: np.ndarray) -> float:
            return float(np.mean([len(set(a) & set(b)) / K for a, b in
                                  zip(found[:, :K].tolist(), truth.tolist(), strict=True)]))
    # Fitted on the whole sample, held-out queries included: fitting needs no labels, and a small
    # sample keeps enough vectors to fit every codec.
    fit_sample = vectors[np.sort(rng.choice(len(vectors), min(FIT_SAMPLE, len(vectors)), replace=False))]
    n = collection_size if collection_size is not None else len(vectors)
    rows = []
    for spec in tqdm(list(specs or candidate_specs(vectors.shape[1], matryoshka)), desc="plan", unit="codec",
                     disable=not progress):
        quality, ms, codec = evaluate_codec(spec, base, queries, judge, fit_sample)
        stored = codec.stored_bytes_per_vector
        rows.append(PlanRow(codec.spec, codec.bytes_per_vector, stored, stored * n, round(quality, 4), metric,
                            round(ms, 4), fits=stored <= budget_bytes_per_vector))
    fitting = [r for r in rows if r.fits]
    # Best quality; among equals the smaller, then the faster.
    best = max(fitting, key=lambda r: (r.quality, -r.stored_bytes_per_vector, -r.search_ms_per_query),
               default=None)
    return Plan(rows, float(budget_bytes_per_vector), best)


def plot(result: Plan, path: Path, title: str) -> None:
    """Quality against stored bytes per vector: every candidate, the frontier, the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result.rows, key=lambda r: (r.stored_bytes_per_vector, -r.quality))
    frontier: list[PlanRow] = []
    best = -np.inf
    for r in rows:  # the best of each size, if it beats every smaller codec
        if r.quality > best and (not frontier or frontier[-1].stored_bytes_per_vector != r.stored_bytes_per_vector):
            frontier.append(r)
            best = r.quality
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([r.stored_bytes_per_vector for r in rows], [r.quality for r in rows], s=18, color="0.55",
               label="candidate codecs")
    ax.plot([r.stored_bytes_per_vector for r in frontier], [r.quality for r in frontier], "o-", color="C0",
            label="frontier")
    for r in frontier:
        ax.annotate(r.spec, (r.stored_bytes_per_vector, r.quality), fontsize=7, xytext=(4, -10),
                    textcoords="offset points")
    ax.axvline(result.budget_bytes_per_vector, color="C3", ls="--",
               label=f"budget {result.budget_bytes_per_vector:g} B/vector")
    if result.recommended is not None:
        r = result.recommended
        ax.scatter([r.stored_bytes_per_vector], [r.quality], s=120, facecolors="none", edgecolors="C3", lw=2,
                   label=f"recommended: {r.spec}")
    ax.set(xscale="log", xlabel="stored bytes per vector (log)", ylabel=rows[0].metric, title=title)
    sizes = sorted({r.stored_bytes_per_vector for r in rows})
    ax.set_xticks(sizes, [str(b) for b in sizes], fontsize=7)
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
