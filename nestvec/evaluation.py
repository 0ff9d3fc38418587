"""Retrieval quality as BEIR reports it (pytrec_eval semantics): nDCG@k and recall@k."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Run = Mapping[str, Sequence[str]]
Qrels = Mapping[str, Mapping[str, int]]


def ndcg_at_k(run: Run, qrels: Qrels, k: int = 10) -> float:
    """Mean nDCG@k over the judged queries, linear gains, log2 discounts."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values = []
    for qid, judged in qrels.items():
        gains = np.array([judged.get(doc, 0) for doc in list(run.get(qid, []))[:k]], dtype=np.float64)
        ideal = np.sort(np.array([g for g in judged.values() if g > 0], dtype=np.float64))[::-1][:k]
        idcg = float(ideal @ discounts[: len(ideal)])
        values.append(float(gains @ discounts[: len(gains)]) / idcg if idcg > 0 else 0.0)
    return float(np.mean(values)) if values else 0.0


def recall_at_k(run: Run, qrels: Qrels, k: int = 100) -> float:
    values = []
    for qid, judged in qrels.items():
        relevant = {doc for doc, grade in judged.items() if grade > 0}
        if relevant:
            values.append(len(relevant.intersection(list(run.get(qid, []))[:k])) / len(relevant))
    return float(np.mean(values)) if values else 0.0


def evaluate(run: Run, qrels: Qrels) -> dict[str, float]:
    return {"ndcg@10": ndcg_at_k(run, qrels, 10), "recall@100": recall_at_k(run, qrels, 100)}
