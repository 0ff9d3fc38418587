"""How much of a model's quality each prefix keeps: nDCG@10 at every prefix dimension of a model,
beside plain truncation and a PCA rotation of a base model at the same dimensions (`nestvec eval-dims`).

Exact cosine search over a BEIR folder; embeddings are computed once per (model weights, dataset)
and cached as .npz under `cache_dir`, since encoding is the slow part on a CPU.
"""

from __future__ import annotations

import hashlib
import time
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
    query_seconds: float | None = None  # how long encoding the queries took (None: cached before it was kept)

    @property
    def queries_per_s(self) -> float | None:
        return round(len(self.query_ids) / self.query_seconds, 1) if self.query_seconds else None


@dataclass
class DimsReport:
    dataset: str
    split: str
    model: str
    base: str | None
    dims: list[int]
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (method, dim[, layers])

    def table(self) -> str:
        """nDCG@10 per dim and method; then, for a 2D model's layer cuts, per (layers, dim)."""
        whole = [r for r in self.rows if "layers" not in r]
        methods = list(dict.fromkeys(r["method"] for r in whole))
        by = {(r["method"], r["dim"]): r for r in whole}
        lines = ["| dims | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
        for dim in self.dims:
            cells = [f"{by[(m, dim)]['ndcg@10']:.4f}" if (m, dim) in by else "" for m in methods]
            lines.append(f"| {dim} | " + " | ".join(cells) + " |")
        cut = [r for r in self.rows if "layers" in r]
        if cut:
            methods = list(dict.fromkeys(r["method"] for r in cut))
            at = {(r["method"], r["layers"], r["dim"]): r for r in cut}
            speed = {r["layers"]: r.get("queries_per_s") for r in cut if r.get("queries_per_s")}
            lines += ["", "| layers | dims | " + " | ".join(methods) + " | queries/s |",
                      "|" + "---|" * (len(methods) + 3)]
            for layers in sorted({r["layers"] for r in cut}, reverse=True):
                for dim in self.dims:
                    cells = [f"{at[(m, layers, dim)]['ndcg@10']:.4f}" if (m, layers, dim) in at else ""
                             for m in methods]
                    lines.append(f"| {layers} | {dim} | " + " | ".join(cells) + f" | {speed.get(layers, '')} |")
        return "\n".join(lines)


def _cache_key(model_path: Path, folder: Path, layers: int | None) -> str:
    stamp = [str(folder.resolve())] + [str((folder / f).stat().st_size) for f in ("corpus.jsonl", "queries.jsonl")]
    if layers is not None:
        stamp.append(f"layers={layers}")
    return hashlib.sha256((weights_sha256(model_path) + "|".join(stamp)).encode()).hexdigest()[:20]


def embed_beir(model: str, folder: Path, cache_dir: Path | None, layers: int | None = None) -> Embedded:
    """Documents and queries of `folder` encoded by `model` (document / query prompts where the
    model has them; with `layers`, its first transformer layers only), from the cache when it holds them."""
    from nestvec.encoders.st import SentenceTransformerEncoder

    path = resolve_model_path(model)
    cache = cache_dir / f"{folder.name}-{_cache_key(path, folder, layers)}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        z = np.load(cache)
        seconds = float(z["query_seconds"]) if "query_seconds" in z.files else None
        return Embedded(z["corpus"], z["corpus_ids"].tolist(), z["queries"], z["query_ids"].tolist(), seconds)
    encoder = SentenceTransformerEncoder(model, layers=layers)
    docs = list(iter_corpus(folder / "corpus.jsonl"))
    queries = load_queries(folder / "queries.jsonl")
    keep = [d for d in docs if d.text.strip()]  # Cranfield has empty abstracts: they can never be found
    corpus = encoder.encode([d.text for d in keep], kind="document", show_progress=True)
    started = time.perf_counter()
    encoded_queries = encoder.encode(list(queries.values()), kind="query", show_progress=True)
    out = Embedded(corpus, [d.id for d in keep], encoded_queries, list(queries), time.perf_counter() - started)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, corpus=out.corpus, corpus_ids=np.array(out.corpus_ids), queries=out.queries,
                 query_ids=np.array(out.query_ids), query_seconds=np.float64(out.query_seconds))
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
              split: str = "test", cache_dir: Path | None = None, label: str | None = None,
              layers: Sequence[int] | None = None) -> DimsReport:
    """nDCG@10 and recall@100 of `model` at each prefix of `dims`; with `base`, the base model's
    plain truncation and PCA at the same dims. A model nestvec trained names its base in its card.
    With `layers` (default for a 2D-trained model: every layer count), the same at each layer cut:
    queries and documents both cut, queries cut against full-depth documents (the cheap-query use),
    and the base model cut alike."""
    from nestvec.encoders.matryoshka import training_card

    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        raise NotFoundError(f"{qrels_path}: no such file")
    qrels = load_qrels(qrels_path)
    card = None if model in BUNDLED_ALIASES else training_card(resolve_model_path(model))
    if base is None and card:
        base = card["base_model"]
    total = total_layers(model)
    if layers is None and card and card.get("config", {}).get("layers"):
        layers = range(1, total + 1)
    cuts = sorted({int(k) for k in layers or ()}, reverse=True)
    if cuts and (cuts[0] > total or cuts[-1] < 1):
        raise invalid("layers", f"must lie in 1..{total}, got {cuts}")
    if cuts:
        cuts = sorted({*cuts, total}, reverse=True)  # the whole model beside its cuts, as the reference
    data = embed_beir(model, folder, cache_dir)
    full = data.corpus.shape[1]
    dims = sorted({int(d) for d in (dims or _default_dims(full))}, reverse=True)
    if dims[0] > full or dims[-1] < 1:
        raise invalid("dims", f"must lie in 1..{full}, got {dims}")
    name = label or (BUNDLED_MODEL if model in BUNDLED_ALIASES else Path(model).name)
    report = DimsReport(folder.name, split, name, base, dims)
    report.rows += _prefix_rows(f"{name} prefix", data, data, dims, qrels)
    base_name = None if base is None else BUNDLED_MODEL if base in BUNDLED_ALIASES else Path(base).name
    if base is not None:
        base_data = embed_beir(base, folder, cache_dir)
        usable = [d for d in dims if d <= base_data.corpus.shape[1]]
        report.rows += _prefix_rows(f"{base_name} truncated", base_data, base_data, usable, qrels)
        for dim in usable:
            if dim > len(base_data.corpus):
                continue  # fewer documents than components: no PCA to fit
            mean, axes = pca_rotation(base_data.corpus, dim)
            report.rows.append(score(f"{base_name} PCA", dim, _unit((base_data.queries - mean) @ axes.T),
                                      _unit((base_data.corpus - mean) @ axes.T), base_data, qrels))
    for k in cuts:
        cut = data if k == total else embed_beir(model, folder, cache_dir, layers=k)
        tag = {"layers": k, "queries_per_s": cut.queries_per_s}
        report.rows += _prefix_rows(f"{name}, both cut", cut, cut, dims, qrels, tag)
        report.rows += _prefix_rows(f"{name}, queries cut", cut, data, dims, qrels, tag)
        if base is not None and total_layers(base) >= k:
            base_cut = embed_beir(base, folder, cache_dir, layers=None if k == total_layers(base) else k)
            usable = [d for d in dims if d <= base_cut.corpus.shape[1]]
            report.rows += _prefix_rows(f"{base_name}, both cut", base_cut, base_cut, usable, qrels, {"layers": k})
    return report


def _prefix_rows(method: str, queries: Embedded, corpus: Embedded, dims: Sequence[int],
                 qrels: dict[str, dict[str, int]], extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One scored row per prefix dim: `queries`' query vectors against `corpus`' documents."""
    return [{**score(method, dim, truncate_normalize(queries.queries, dim), truncate_normalize(corpus.corpus, dim),
                     corpus, qrels), **(extra or {})} for dim in dims]


def total_layers(model: str) -> int:
    """Transformer layers of a model folder, from its config (no weights loaded)."""
    import json

    config = json.loads((resolve_model_path(model) / "config.json").read_text(encoding="utf-8"))
    count = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
    if not count:
        raise invalid("layers", f"{model}'s config names no num_hidden_layers")
    return int(count)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _default_dims(full: int) -> list[int]:
    return [d for d in (full, 512, 384, 256, 128, 64, 32) if d <= full]


def draw(ax: Any, report: DimsReport) -> None:
    """nDCG@10 against dims on a matplotlib axis, one line per method (and layer cut)."""
    for method, layers in dict.fromkeys((r["method"], r.get("layers")) for r in report.rows):
        rows = sorted((r for r in report.rows if r["method"] == method and r.get("layers") == layers),
                      key=lambda r: r["dim"])
        label = method if layers is None else f"{method} at {layers} layers"
        ax.plot([r["dim"] for r in rows], [r["ndcg@10"] for r in rows], marker="o", label=label,
                linestyle="-" if layers is None else ":")
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
