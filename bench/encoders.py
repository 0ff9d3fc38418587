"""Encoder speed and quality: plain sentence-transformers vs nestvec (SciFact precisions; wiki250k pipeline).

The baseline ("plain") is what users start from: SentenceTransformer(path).encode(texts) with its
defaults (fp32, batch 32). nestvec's fast path loads bf16 weights and encodes in batches of 16.

Per precision: docs/s on a fixed slice of the first 500 corpus documents (after a 32-doc warm-up; best of
--repeats passes), then the full corpus and all queries are encoded (cached in <repo>/.cache/embeddings/
per precision), searched exactly (fp32 FlatIndex, k=100) on the test qrels, and compared with the shipped embeddings.
Writes <out>/encoders.json and <out>/encoders.png.

    python bench/encoders.py [--precisions plain,fp32,bf16] [--no-cache] [--repeats 3] [--out bench/results]

--mode pipeline (for a GPU: issue 10, item 5) times, on the first --n wiki250k passages (~130 words), plain
sentence-transformers `encode_document` in fp32 and fp16 (its defaults otherwise: batch 32, numpy out)
against nestvec's pipelined encoder (encoders/fast.py: threads tokenising ahead of the model, token-budget
length buckets, pinned non-blocking copies) in fp16, one row per --tokens-per-batch value; every row's
vectors are compared with plain fp32's (cosine min / mean). Best of --repeats passes after a warm-up.
Writes <out>/encoders-pipeline-<device type>.json and .png.

    python bench/encoders.py --mode pipeline --device cuda --n 20000 [--variants plain-fp32,plain-fp16,nestvec-fp16]
        [--tokens-per-batch 16384,32768,65536] [--workers 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from itertools import islice
from pathlib import Path
from typing import Any, cast

import numpy as np

from nestvec.compression import make_codec
from nestvec.datasets import Document, iter_corpus, load_qrels, load_queries
from nestvec.encoders import PipelineConfig, SentenceTransformerEncoder
from nestvec.encoders.st import Precision, resolve_model_path
from nestvec.evaluation import evaluate
from nestvec.index.flat import FlatIndex

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "embeddings"
MODEL = "all-MiniLM-L6-v2"
DATASET = "scifact"
SPEED_DOCS = 500
WARMUP_DOCS = 32
K = 100
PIPELINE_VARIANTS = ("plain-fp32", "plain-fp16", "nestvec-fp32", "nestvec-fp16", "nestvec-fp16-nopipe")
# corpus, corpus ids, queries, query ids, full-corpus encode seconds (None if unknown), from cache
Encoded = tuple[np.ndarray, list[str], np.ndarray, list[str], float | None, bool]


def shared_data() -> Path:
    """The shared data folder: $NESTVEC_SHARED/data, else <repo>/../shared/data."""
    root = os.environ.get("NESTVEC_SHARED")
    return Path(root) / "data" if root else REPO.parent / "shared" / "data"


def cpu_info() -> dict[str, Any]:
    """CPU model and the bf16-related flags from /proc/cpuinfo (empty on other systems)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        text = ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {"cpu_model": model or platform.processor(), "logical_cpus": os.cpu_count(),
            "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx_tile": "amx_tile" in flags}


class PlainSentenceTransformer:
    """The baseline: sentence-transformers with its default settings, no nestvec tuning."""

    def __init__(self, device: str = "cpu", dtype: str = "fp32", batch_size: int = 32) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        kwargs = {"model_kwargs": {"dtype": torch.float16}} if dtype == "fp16" else {}
        self.model = SentenceTransformer(str(resolve_model_path(MODEL)), device=device, **kwargs)
        self.batch_size = batch_size

    def encode(self, texts: list[str], *, kind: str = "document", show_progress: bool = False) -> np.ndarray:
        fn = self.model.encode_query if kind == "query" else self.model.encode_document
        return np.asarray(fn(texts, batch_size=self.batch_size, show_progress_bar=show_progress,
                             normalize_embeddings=True), dtype=np.float32)


AnyEncoder = SentenceTransformerEncoder | PlainSentenceTransformer


def make_encoder(precision: str, device: str = "cpu") -> AnyEncoder:
    if precision == "plain":
        return PlainSentenceTransformer(device)
    return SentenceTransformerEncoder(MODEL, precision=cast(Precision, precision), device=device)


def time_encode(encoder: AnyEncoder, texts: list[str]) -> float:
    """Seconds to encode `texts` as documents (one call, no progress bar)."""
    start = time.perf_counter()
    encoder.encode(texts, kind="document", show_progress=False)
    return time.perf_counter() - start


def encode_all(encoder: AnyEncoder, folder: Path, docs: list[Document], queries: dict[str, str],
               precision: str, use_cache: bool, device: str = "cpu") -> Encoded:
    """Corpus + all query vectors for one precision, from cache when allowed.

    Also returns the seconds the full corpus took to encode (as recorded in the cache, None if unknown)
    and whether the vectors came from the cache.
    """
    on = "" if device == "cpu" else f"-{device.replace(':', '')}"
    path = CACHE / f"{folder.name}-{MODEL}-{precision}{on}.npz"
    stamp = np.array([(folder / f).stat().st_size for f in ("corpus.jsonl", "queries.jsonl")])
    if use_cache and path.exists():
        z = np.load(path)
        if np.array_equal(z["stamp"], stamp):
            print(f"  [{precision}] embeddings from cache {path}")
            seconds = float(z["corpus_seconds"]) if "corpus_seconds" in z.files else None
            return z["corpus"], z["corpus_ids"].tolist(), z["queries"], z["query_ids"].tolist(), seconds, True
    print(f"  [{precision}] encoding {len(docs)} docs + {len(queries)} queries ...", flush=True)
    start = time.perf_counter()
    corpus = encoder.encode([d.text for d in docs], kind="document", show_progress=True)
    seconds = time.perf_counter() - start
    qvecs = encoder.encode(list(queries.values()), kind="query", show_progress=False)
    doc_ids, query_ids = [d.id for d in docs], list(queries)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, corpus=corpus, corpus_ids=np.array(doc_ids), queries=qvecs, query_ids=np.array(query_ids),
             stamp=stamp, corpus_seconds=seconds)
    tmp.replace(path)
    return corpus, doc_ids, qvecs, query_ids, seconds, False


def align(vectors: np.ndarray, ids: list[str], ref_ids: list[str]) -> np.ndarray:
    """Rows of `vectors` reordered to `ref_ids`."""
    pos = {x: i for i, x in enumerate(ids)}
    return vectors[[pos[x] for x in ref_ids]]


def search_metrics(corpus: np.ndarray, doc_ids: list[str], queries: np.ndarray, query_ids: list[str],
                   qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """Exact fp32 search (FlatIndex) of the qrels' queries, k=100."""
    codec = make_codec("fp32", corpus.shape[1]).fit(corpus[:1])
    index = FlatIndex(codec)
    index.append(codec.encode(corpus))
    qids = list(qrels)
    _, rows = index.search(align(queries, query_ids, qids), K)
    ids = np.asarray(doc_ids)
    return evaluate({q: ids[r[r >= 0]].tolist() for q, r in zip(qids, rows, strict=True)}, qrels)


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Row-wise cosine between two aligned arrays: min and mean."""
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def plot(rows: list[dict[str, Any]], cpu: str, path: Path) -> None:
    """Bar chart of docs/s per precision, each bar annotated with nDCG@10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    names = [r["precision"] for r in rows]
    speeds = [r["docs_per_s"] for r in rows]
    bars = ax.bar(names, speeds, color=["tab:blue", "tab:orange", "tab:green", "tab:red"][: len(rows)])
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(f"{r['docs_per_s']:.1f} docs/s\nnDCG@10 {r['ndcg10']:.4f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"docs/s (first {SPEED_DOCS} SciFact docs, best run)")
    ax.set_title(f"{MODEL} on CPU\n{cpu}", fontsize=9)
    ax.set_ylim(0, max(speeds) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def load_passages(n: int) -> list[str]:
    """The first n wiki250k passages as "<title>. <text>" (as ingested)."""
    return [d.text for d in islice(iter_corpus(shared_data() / "wiki250k" / "passages.jsonl.gz"), n)]


def make_variant(name: str, device: str, budget: int, workers: int | None, plain_batch: int) -> AnyEncoder:
    """plain-<fp32|fp16>: sentence-transformers as is; nestvec-<precision>[-nopipe]: the nestvec encoder."""
    kind, precision, *rest = name.split("-")
    if kind == "plain":
        return PlainSentenceTransformer(device, precision, plain_batch)
    pipeline: bool | PipelineConfig = False if rest == ["nopipe"] else PipelineConfig(budget, workers=workers)
    return SentenceTransformerEncoder(MODEL, device=device, precision=cast(Precision, precision), pipeline=pipeline)


def device_info(device: str) -> dict[str, Any]:
    """The accelerator's name and memory (CUDA), else the CPU's."""
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        return {"device_name": props.name, "device_memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda, **cpu_info()}
    return {"device_name": cpu_info()["cpu_model"], **cpu_info()}


def plot_pipeline(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Bar chart of passages/s per variant, each bar annotated with its speedup and min cosine to plain fp32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows)), 4))
    speeds = [r["passages_per_s"] for r in rows]
    colors = ["tab:blue" if r["variant"].startswith("plain") else "tab:green" for r in rows]
    bars = ax.bar([r["variant"] for r in rows], speeds, color=colors)
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(f"{r['passages_per_s']:,.0f}/s\n{r['speedup_vs_plain_fp32']:.2f}x\n"
                    f"cos min {r['cosine_vs_plain_fp32']['min']:.6f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("passages/s (best run)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(speeds) * 1.35)
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run_pipeline(args: argparse.Namespace) -> None:
    """Plain sentence-transformers vs the pipelined encoder on wiki250k passages, on one device."""
    import sentence_transformers
    import torch

    device = args.device
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in PIPELINE_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(PIPELINE_VARIANTS)}")
    budgets = [int(b) for b in (args.tokens_per_batch or str(PipelineConfig.for_device(device).tokens_per_batch))
               .split(",")]
    # one row per (variant, budget) for pipelined variants; plain fp32 first: it is the reference
    runs = [(v, b) for v in variants for b in (budgets if v.startswith("nestvec") and "nopipe" not in v else [0])]
    if "plain-fp32" not in variants:
        runs.insert(0, ("plain-fp32", 0))
    runs.sort(key=lambda r: r[0] != "plain-fp32")
    texts = load_passages(args.n)
    info = device_info(device)
    words = float(np.mean([len(t.split()) for t in texts]))
    print(f"{len(texts)} wiki250k passages ({words:.0f} words on average) on {device}: {info['device_name']}; "
          f"torch {torch.__version__}, sentence-transformers {sentence_transformers.__version__}", flush=True)

    reference: np.ndarray | None = None
    measured: list[dict[str, Any]] = []
    for variant, budget in runs:
        encoder = make_variant(variant, device, budget, args.workers, args.plain_batch)
        timed = variant in variants
        name = f"{variant}@{budget}" if budget and len(budgets) > 1 else variant
        encoder.encode(texts[: args.warmup], kind="document", show_progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds: list[float] = []
        vectors = np.empty(0)
        for _ in range(args.repeats if timed else 1):
            start = time.perf_counter()
            vectors = encoder.encode(texts, kind="document", show_progress=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        reference = vectors if reference is None else reference  # plain fp32 runs first
        row = {
            "variant": name, "timed": timed, "tokens_per_batch": budget or None,
            "pipelined": bool(getattr(encoder, "pipelined", False)),
            "seconds_runs": seconds, "seconds": min(seconds), "passages_per_s": len(texts) / min(seconds),
            "passages_per_s_median": len(texts) / float(np.median(seconds)),
            "cosine_vs_plain_fp32": cosine_stats(vectors, reference),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
        }
        print(f"  [{name}] {', '.join(f'{t:.2f}' for t in seconds)} s; best {row['passages_per_s']:,.0f} passages/s; "
              f"cos min {row['cosine_vs_plain_fp32']['min']:.6f}", flush=True)
        measured.append(row)
        del encoder
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    base = measured[0]["passages_per_s"]
    fp16 = next((r["passages_per_s"] for r in measured if r["variant"] == "plain-fp16"), None)
    rows = [r for r in measured if r["timed"]]
    for r in rows:
        r["speedup_vs_plain_fp32"] = r["passages_per_s"] / base
        r["speedup_vs_plain_fp16"] = r["passages_per_s"] / fp16 if fp16 else None

    print(f"\nwiki250k: {len(texts)} passages on {info['device_name']}, best of {args.repeats}")
    header = f"{'variant':<22} {'passages/s':>11} {'vs fp32':>8} {'vs fp16':>8} {'cos min':>9} {'cos mean':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        vs16 = f"{r['speedup_vs_plain_fp16']:.2f}x" if r["speedup_vs_plain_fp16"] is not None else "-"
        c = r["cosine_vs_plain_fp32"]
        print(f"{r['variant']:<22} {r['passages_per_s']:>11,.0f} {r['speedup_vs_plain_fp32']:>7.2f}x {vs16:>8} "
              f"{c['min']:>9.6f} {c['mean']:>9.6f}")

    args.out.mkdir(parents=True, exist_ok=True)
    kind = device.split(":")[0]
    report = {
        "metadata": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "dataset": "wiki250k", "passages": len(texts), "mean_words": words, "model": MODEL,
            "device": device, **info, "warmup_passages": args.warmup, "repeats": args.repeats,
            "statistic": "best of repeats", "plain_batch_size": args.plain_batch, "workers": args.workers,
            "reference": "plain sentence-transformers fp32 on the same device, normalised",
            "torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        },
        "rows": rows,
    }
    json_path, png_path = args.out / f"encoders-pipeline-{kind}.json", args.out / f"encoders-pipeline-{kind}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_pipeline(rows, f"{MODEL}, {len(texts)} wiki250k passages\n{info['device_name']}", png_path)
    print(f"\nwrote {json_path} and {png_path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="plain,fp32,bf16", help="comma-separated: plain, fp32, bf16, fp16")
    parser.add_argument("--no-cache", action="store_true", help="re-encode the full corpus even if cached")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the speed slice (best is reported)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--mode", choices=("precisions", "pipeline"), default="precisions",
                        help="precisions: SciFact speed + nDCG per precision; pipeline: wiki250k, plain vs pipelined")
    parser.add_argument("--n", type=int, default=20000, help="pipeline: wiki250k passages to encode")
    parser.add_argument("--variants", default="plain-fp32,plain-fp16,nestvec-fp16",
                        help=f"pipeline: comma-separated, of {', '.join(PIPELINE_VARIANTS)}")
    parser.add_argument("--tokens-per-batch", default=None,
                        help="pipeline: padded-token budget per batch, comma-separated for one row each "
                             "(default: the device's, 32768 on a GPU)")
    parser.add_argument("--workers", type=int, default=None, help="pipeline: tokenizer threads (default: auto)")
    parser.add_argument("--plain-batch", type=int, default=32, help="pipeline: plain encode batch size")
    parser.add_argument("--warmup", type=int, default=1024, help="pipeline: passages encoded before timing")
    args = parser.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.mode == "pipeline":
        run_pipeline(args)
        return

    folder = shared_data() / DATASET
    docs = list(iter_corpus(folder / "corpus.jsonl"))
    queries = load_queries(folder / "queries.jsonl")
    qrels = load_qrels(folder / "qrels" / "test.tsv")
    shipped_dir = folder / "minilm"
    shipped_ids = (shipped_dir / "corpus_ids.txt").read_text(encoding="utf-8").splitlines()
    shipped = np.load(shipped_dir / "corpus.npy")
    shipped_qids = (shipped_dir / "queries_ids.txt").read_text(encoding="utf-8").splitlines()
    shipped_q = np.load(shipped_dir / "queries.npy")
    speed_texts = [d.text for d in docs[:SPEED_DOCS]]
    cpu = cpu_info()
    print(f"{cpu['cpu_model']}, {cpu['logical_cpus']} CPUs, amx_bf16={cpu['amx_bf16']}, "
          f"avx512_bf16={cpu['avx512_bf16']}, torch {torch.__version__} threads={torch.get_num_threads()}")

    rows: list[dict[str, Any]] = []
    for precision in precisions:
        encoder = make_encoder(precision, args.device)
        time_encode(encoder, speed_texts[:WARMUP_DOCS])
        runs = [time_encode(encoder, speed_texts) for _ in range(args.repeats)]
        seconds = min(runs)
        print(f"  [{precision}] {len(speed_texts)} docs: {', '.join(f'{t:.2f}' for t in runs)} s; "
              f"best {len(speed_texts) / seconds:.1f} docs/s", flush=True)
        corpus, doc_ids, qvecs, qids, full_s, cached = encode_all(encoder, folder, docs, queries, precision,
                                                          use_cache=not args.no_cache, device=args.device)
        metrics = search_metrics(corpus, doc_ids, qvecs, qids, qrels)
        rows.append({
            "precision": precision, "speed_docs": len(speed_texts), "speed_seconds_runs": runs,
            "speed_seconds": seconds, "docs_per_s": len(speed_texts) / seconds,
            "docs_per_s_median": len(speed_texts) / float(np.median(runs)),
            "full_corpus_seconds": full_s, "full_corpus_docs_per_s": len(docs) / full_s if full_s else None,
            "full_corpus_from_cache": cached,
            "ndcg10": metrics["ndcg@10"], "recall100": metrics["recall@100"],
            "cosine_vs_shipped_docs": cosine_stats(align(corpus, doc_ids, shipped_ids), shipped),
            "cosine_vs_shipped_queries": cosine_stats(align(qvecs, qids, shipped_qids), shipped_q),
        })
        del encoder

    base = next((r for r in rows if r["precision"] == "plain"), None) or next(
        (r for r in rows if r["precision"] == "fp32"), None)
    for r in rows:
        r["speedup_vs_base"] = r["docs_per_s"] / base["docs_per_s"] if base else None
        r["ndcg_change_pct_vs_base"] = 100.0 * (r["ndcg10"] - base["ndcg10"]) / base["ndcg10"] if base else None

    print(f"\nSciFact: {len(docs)} docs, {len(qrels)} test queries; "
          f"speed on the first {SPEED_DOCS} docs, best of {args.repeats}")
    header = (f"{'precision':<9} {'docs/s':>8} {'speedup':>8} {'nDCG@10':>8} {'R@100':>7} {'dnDCG%':>7} "
              f"{'cos min':>9} {'cos mean':>9} {'q cos min':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        speedup = f"{r['speedup_vs_base']:.2f}x" if r["speedup_vs_base"] is not None else "-"
        change = f"{r['ndcg_change_pct_vs_base']:+.2f}" if r["ndcg_change_pct_vs_base"] is not None else "-"
        d, q = r["cosine_vs_shipped_docs"], r["cosine_vs_shipped_queries"]
        print(f"{r['precision']:<9} {r['docs_per_s']:>8.1f} {speedup:>8} {r['ndcg10']:>8.4f} {r['recall100']:>7.4f} "
              f"{change:>7} {d['min']:>9.6f} {d['mean']:>9.6f} {q['min']:>9.6f}")

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "metadata": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "dataset": DATASET, "docs": len(docs), "queries": len(queries), "test_queries": len(qrels),
            "model": MODEL, "speed_docs": SPEED_DOCS, "warmup_docs": WARMUP_DOCS,
            "speed_repeats": args.repeats, "speed_statistic": "best of repeats", "k": K,
            "search": "exact fp32 FlatIndex on test qrels", "reference": "shipped minilm embeddings (fp32, CPU)",
            "device": args.device,
            **cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "rows": rows,
    }
    json_path, png_path = args.out / "encoders.json", args.out / "encoders.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(rows, str(cpu["cpu_model"]), png_path)
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
