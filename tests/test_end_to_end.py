"""A small real ingest + eval through the CLI on a SciFact slice, checked against the shipped vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nestvec.cli import main as cli
from nestvec.datasets import load_qrels
from nestvec.evaluation import evaluate, ndcg_at_k, recall_at_k
from realdata import DATA, corpus_slice, shipped_embeddings

N_QUERIES = 40
N_DOCS = 300


def test_ingest_eval_search_on_scifact_slice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qrels = load_qrels(DATA / "scifact" / "qrels" / "test.tsv")
    chosen = dict(sorted(qrels.items())[:N_QUERIES])
    doc_ids, vectors = shipped_embeddings("scifact")
    wanted = {d for judged in chosen.values() for d in judged}
    rows = sorted({doc_ids.index(d) for d in wanted} | set(range(N_DOCS - len(wanted))))
    corpus = corpus_slice("scifact", tmp_path, rows)  # corpus.jsonl and corpus_ids.txt share line order
    qrels_file = tmp_path / "qrels.tsv"
    qrels_file.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{s}\n" for q, judged in chosen.items() for d, s in judged.items()))

    store = str(tmp_path / "store")
    assert cli(["--data", store, "ingest", str(corpus), "--collection", "sci", "--codec", "fp8"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["count"] == len(rows) and summary["bytes_per_vector"] == 384

    assert cli(["--data", store, "eval", "sci", "--queries", str(DATA / "scifact" / "queries.jsonl"),
                "--qrels", str(qrels_file)]) == 0
    measured = json.loads(capsys.readouterr().out)

    # Reference: exact float32 search over the shipped MiniLM vectors of the same documents.
    query_ids = (DATA / "scifact" / "minilm" / "queries_ids.txt").read_text().split()
    query_vectors = np.load(DATA / "scifact" / "minilm" / "queries.npy")
    qids = sorted(chosen)
    scores = query_vectors[[query_ids.index(q) for q in qids]] @ vectors[rows].T
    run = {q: [doc_ids[rows[j]] for j in np.argsort(-s)[:100]] for q, s in zip(qids, scores, strict=True)}
    reference = evaluate(run, chosen)
    assert measured["queries"] == N_QUERIES
    assert abs(measured["ndcg@10"] - reference["ndcg@10"]) < 0.02
    assert abs(measured["recall@100"] - reference["recall@100"]) < 0.02
    assert reference["ndcg@10"] > 0.5  # the slice is a meaningful retrieval task

    assert cli(["--data", store, "search", "sci", "vitamin D and bone fractures", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].lstrip().startswith("1.")
    assert cli(["--data", store, "info", "sci"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == len(rows)


def test_metrics_on_hand_checked_cases() -> None:
    qrels = {"q": {"a": 2, "b": 1}}
    assert ndcg_at_k({"q": ["a", "b"]}, qrels) == pytest.approx(1.0)
    assert ndcg_at_k({"q": ["b", "a"]}, qrels) == pytest.approx((1 + 2 / np.log2(3)) / (2 + 1 / np.log2(3)))
    assert ndcg_at_k({"q": ["x", "y"]}, qrels) == 0.0
    assert recall_at_k({"q": ["x", "b"]}, qrels, k=100) == 0.5
