"""How much of a model's quality each prefix keeps: nDCG@10 at every prefix dimension of a model,
beside plain truncation and a PCA rotation of a base model at the same dimensions (`nestvec eval-dims`).

Exact cosine search over a BEIR folder; embeddings are computed once per (model weights, dataset)
and cached as .npz under `cache_dir`, since encoding is the slow part on a CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nestvec.datasets import iter_corpus, load_qrels, load_queries
from nestvec.encoders.base import truncate_normalize
from nestvec.encoders.st import BUNDLED_ALIASES, BUNDLED_MODEL, resolve_model_path, weights_sha256
from nestvec.errors import NotFoundError, invalid
from nestvec.evaluation import ndcg_at_k, recall_at_k
from nestvec.fsutil import write_json


@dataclass(frozen=True)
class Embedded:
    corpus: np.ndarray
    corpus_ids: list[str]
    queries: np.ndarray
    query_ids: list[str]


@dataclass
class DimsReport:
    dataset: str
    split: str
    model: str
    base: str | None
    dims: list[int]
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (method, dim)

    def table(self) -> str:
        methods = list(dict.fromkeys(r["method"] for r in self.rows))
        by = {(r["method"], r["dim"]): r for r in self.rows}
        head = "| dims | " + " | ".join(methods) + " |"
        lines = [head, "|" + "---|" * (len(methods) + 1)]
        for dim in self.dims:
            cells = [f"{by[(m, dim)]['ndcg@10']:.4f}" if (m, dim) in by else "" for m in methods]
            lines.append(f"| {dim} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _cache_key(model_path: Path, folder: Path) -> str:
    stamp = [str(folder.resolve())] + [str((folder / f).stat().st_size) for f in ("corpus.jsonl", "queries.jsonl")]
    return hashlib.sha256((weights_sha256(model_path) + "|".join(stamp)).encode()).hexdigest()[:20]


def embed_beir(model: str, folder: Path, cache_dir: Path | None) -> Embedded:
    """Documents and queries of `folder` encoded by `model` (document / query prompts where the
    model has them), from the cache when it holds them."""
    from nestvec.encoders.st import SentenceTransformerEncoder

    path = resolve_model_path(model)
    cache = cache_dir / f"{folder.name}-{_cache_key(path, folder)}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        z = np.load(cache)
        return Embedded(z["corpus"], z["corpus_ids"].tolist(), z["queries"], z["query_ids"].tolist())
    encoder = SentenceTransformerEncoder(model)
    docs = list(iter_corpus(folder / "corpus.jsonl"))
    queries = load_queries(folder / "queries.jsonl")
    keep = [d for d in docs if d.text.strip()]  # Cranfield has empty abstracts: they can never be found
    corpus = encoder.encode([d.text for d in keep], kind="document", show_progress=True)
    encoded_queries = encoder.encode(list(queries.values()), kind="query", show_progress=True)
    out = Embedded(corpus, [d.id for d in keep], encoded_queries, list(queries))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, corpus=out.corpus, corpus_ids=np.array(out.corpus_ids), queries=out.queries,
                 query_ids=np.array(out.query_ids))
    return out


def _run(queries: np.ndarray, corpus: np.ndarray, query_ids: Sequence[str], corpus_ids: Sequence[str],
         k: int = 100) -> dict[str, list[str]]:
    """Exact top-k by inner product (the vectors are unit length), by faiss."""
    import faiss

    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(corpus, dtype=np.float32))
    _, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(corpus_ids)))
    ids = np.asarray(corpus_ids)
    return {qid: ids[row[row >= 0]].tolist() for qid, row in zip(query_ids, rows, strict=True)}


def score(name: str, dim: int, queries: np.ndarray, corpus: np.ndarray, data: Embedded,
           qrels: dict[str, dict[str, int]]) -> dict[str, Any]:
    run = _run(queries, corpus, data.query_ids, data.corpus_ids)
    return {"method": name, "dim": dim, "ndcg@10": round(ndcg_at_k(run, qrels, 10), 4),
            "recall@100": round(recall_at_k(run, qrels, 100), 4)}


def pca_rotation(corpus: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean and top-`dim` principal axes of the corpus vectors (scikit-learn's PCA)."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=dim, svd_solver="full", random_state=0).fit(corpus)
    return pca.mean_.astype(np.float32), pca.components_.astype(np.float32)


def eval_dims(model: str, folder: Path | str, *, base: str | None = None, dims: Sequence[int] | None = None,
              split: str = "test", cache_dir: Path | None = None, label: str | None = None) -> DimsReport:
    """nDCG@10 and recall@100 of `model` at each prefix of `dims`; with `base`, the base model's
    plain truncation and PCA at the same dims. A model nestvec trained names its base in its card."""
    from nestvec.encoders.matryoshka import training_card

    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        raise NotFoundError(f"{qrels_path}: no such file")
    qrels = load_qrels(qrels_path)
    if base is None and model not in BUNDLED_ALIASES:
        card = training_card(resolve_model_path(model))
        base = card["base_model"] if card else None
    data = embed_beir(model, folder, cache_dir)
    full = data.corpus.shape[1]
    dims = sorted({int(d) for d in (dims or _default_dims(full))}, reverse=True)
    if dims[0] > full or dims[-1] < 1:
        raise invalid("dims", f"must lie in 1..{full}, got {dims}")
    name = label or (BUNDLED_MODEL if model in BUNDLED_ALIASES else Path(model).name)
    report = DimsReport(folder.name, split, name, base, dims)
    for dim in dims:
        report.rows.append(score(f"{name} prefix", dim, truncate_normalize(data.queries, dim),
                                  truncate_normalize(data.corpus, dim), data, qrels))
    if base is not None:
        base_data = embed_beir(base, folder, cache_dir)
        base_name = BUNDLED_MODEL if base in BUNDLED_ALIASES else Path(base).name
        for dim in dims:
            if dim > base_data.corpus.shape[1]:
                continue
            report.rows.append(score(f"{base_name} truncated", dim, truncate_normalize(base_data.queries, dim),
                                      truncate_normalize(base_data.corpus, dim), base_data, qrels))
            if dim > len(base_data.corpus):
                continue  # fewer documents than components: no PCA to fit
            mean, axes = pca_rotation(base_data.corpus, dim)
            report.rows.append(score(f"{base_name} PCA", dim, _unit((base_data.queries - mean) @ axes.T),
                                      _unit((base_data.corpus - mean) @ axes.T), base_data, qrels))
    return report


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _default_dims(full: int) -> list[int]:
    return [d for d in (full, 512, 384, 256, 128, 64, 32) if d <= full]


def draw(ax: Any, report: DimsReport) -> None:
    """nDCG@10 against dims on a matplotlib axis, one line per method."""
    for method in dict.fromkeys(r["method"] for r in report.rows):
        rows = sorted((r for r in report.rows if r["method"] == method), key=lambda r: r["dim"])
        ax.plot([r["dim"] for r in rows], [r["ndcg@10"] for r in rows], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(report.dims, [str(d) for d in report.dims])
    ax.set(xlabel="embedding dimensions (prefix / PCA components)", ylabel=f"nDCG@10 ({report.split})",
           title=f"{report.dataset}: quality per dimension")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_report(report: DimsReport, out: Path) -> tuple[Path, Path]:
    """JSON and a PNG (nDCG@10 against dims, one line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"dims-{report.dataset}-{report.model}"
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    write_json(json_path, asdict(report))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    draw(ax, report)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path
