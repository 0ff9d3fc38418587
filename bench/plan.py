"""Does the compression planner pick well? On SciFact and Cranfield (shipped MiniLM embeddings, test
qrels): every candidate codec is evaluated exhaustively by nDCG@10 on the whole corpus, and the
planner picks at 192 and 96 bytes per vector from its label-free proxy alone (recall@10 against
float32 with held-out documents as queries). Reports the pick's nDCG@10 against the best at each
budget and the Spearman rank correlation of proxy and nDCG@10 over all candidates. Writes
<out>/plan.json and one frontier PNG per dataset and budget.

    python bench/plan.py [--datasets scifact,cranfield] [--budgets 192,96] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nestvec.compression.planner import Labels, Plan, PlanRow, candidate_specs, plan, plot
from nestvec.datasets import load_qrels

try:
    from bench.compression import load_shipped, shared_data
except ImportError:  # run as a script: bench/ is sys.path[0]
    from compression import load_shipped, shared_data  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho with average ranks for ties (scipy's definition), in numpy."""
    def ranks(x: list[float]) -> np.ndarray:
        values = np.asarray(x, dtype=np.float64)
        order = np.argsort(values, kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=np.float64)
        for v in np.unique(values):  # ties share their mean rank
            r[values == v] = r[values == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def labels_for(folder: Path, emb: Any) -> Labels:
    qrels = load_qrels(folder / "qrels" / "test.tsv")
    doc_row = {d: i for i, d in enumerate(emb.corpus_ids)}
    query_row = {q: i for i, q in enumerate(emb.query_ids)}
    qids = [q for q in qrels if q in query_row]
    relevant = [{doc_row[d]: g for d, g in qrels[q].items() if d in doc_row and g > 0} for q in qids]
    return Labels(emb.queries[[query_row[q] for q in qids]], relevant)


def sampled(labels: Labels, n_docs: int, size: int, seed: int = 0) -> tuple[np.ndarray, Labels]:
    """What the planner sees with labels: `size` documents (every judged one plus random others),
    the relevance judgements renumbered to rows of that sample."""
    judged = sorted({d for rel in labels.relevant for d in rel})
    others = np.setdiff1d(np.arange(n_docs), judged)
    extra = np.random.default_rng(seed).choice(others, max(0, min(size - len(judged), len(others))), replace=False)
    rows = np.sort(np.concatenate([np.asarray(judged, dtype=np.int64), extra.astype(np.int64)]))
    position = {int(r): i for i, r in enumerate(rows.tolist())}
    return rows, Labels(labels.queries, [{position[d]: g for d, g in rel.items()} for rel in labels.relevant])


def best_at(rows: list[PlanRow], budget: float) -> PlanRow:
    return max((r for r in rows if r.stored_bytes_per_vector <= budget), key=lambda r: r.quality)


def run(name: str, budgets: list[float], out: Path, sample_size: int) -> dict[str, Any]:
    folder = shared_data() / name
    emb = load_shipped(folder)
    corpus = np.ascontiguousarray(emb.corpus, dtype=np.float32)
    specs = candidate_specs(corpus.shape[1])
    print(f"[{name}] {len(corpus)} docs, {len(specs)} candidate codecs")
    labels = labels_for(folder, emb)
    exhaustive = plan(corpus, max(budgets), labels=labels, specs=specs, progress=False)
    ndcg = {r.spec: r.quality for r in exhaustive.rows}
    rows, sample_labels = sampled(labels, len(corpus), sample_size)
    result: dict[str, Any] = {"docs": len(corpus), "labelled_sample_docs": len(rows), "candidates": specs,
                              "budgets": {}}
    proxy: Plan | None = None
    for budget in budgets:
        best = best_at(exhaustive.rows, budget)
        entry: dict[str, Any] = {"best": best.spec, "best_ndcg10": ndcg[best.spec]}
        labelled = plan(corpus[rows], budget, labels=sample_labels, specs=specs, collection_size=len(corpus),
                        progress=False)
        proxy = plan(corpus, budget, specs=specs, progress=False)  # label-free: what a user without qrels gets
        for mode, chosen in (("labelled_sample", labelled), ("label_free_proxy", proxy)):
            assert chosen.recommended is not None
            pick = chosen.recommended.spec
            gap = 100 * (ndcg[best.spec] - ndcg[pick]) / ndcg[best.spec]
            entry[mode] = {"pick": pick, "pick_ndcg10": ndcg[pick], "gap_pct": round(gap, 3)}
            print(f"[{name}] budget {budget:g} B, {mode}: picks {pick} (nDCG@10 {ndcg[pick]:.4f}); "
                  f"exhaustive best {best.spec} ({ndcg[best.spec]:.4f}); gap {gap:.2f}%")
        png = out / f"plan-{name}-{int(budget)}.png"
        plot(proxy, png, f"{name}: codec frontier (label-free proxy), budget {budget:g} B/vector")
        entry["plot"] = png.name
        result["budgets"][str(int(budget))] = entry
    assert proxy is not None
    proxy_quality = {r.spec: r.quality for r in proxy.rows}
    rho = spearman([proxy_quality[s] for s in ndcg], [ndcg[s] for s in ndcg])
    print(f"[{name}] Spearman(proxy recall@10, nDCG@10) over {len(ndcg)} codecs: {rho:.3f}")
    print(exhaustive.table())
    result.update(spearman=round(rho, 4), rows=[
        {**r.to_json(), "ndcg10": ndcg[r.spec], "proxy_recall10": proxy_quality[r.spec]} for r in exhaustive.rows])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="scifact,cranfield")
    parser.add_argument("--budgets", default="192,96", help="bytes per vector")
    parser.add_argument("--sample", type=int, default=20_000,
                        help="documents the labelled planner measures (the CLI's default with --qrels)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    report = {"metadata": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                           "embeddings": "shipped all-MiniLM-L6-v2 (384 dims)", "qrels": "test",
                           "proxy": "recall@10 vs float32, 300 held-out documents as queries",
                           "labelled_sample": f"{args.sample} documents: every judged one plus random others"},
              "datasets": {name: run(name, budgets, args.out, args.sample)
                           for name in args.datasets.split(",") if name}}
    path = args.out / "plan.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
