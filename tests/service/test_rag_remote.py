"""The RAG pipeline over a gRPC collection gives what it gives over the embedded one."""

from __future__ import annotations

from pathlib import Path

from tinylm import tiny_llama

import nestvec
from nestvec.datasets import iter_corpus
from nestvec.rag import RAG
from realdata import DATA, shipped_embeddings
from servers import ADMIN_KEY, RunningServer

QUESTION = "Is obesity a risk factor for type 2 diabetes?"


def test_rag_over_grpc_matches_embedded(tmp_path: Path) -> None:
    tiny_lm = tiny_llama()
    ids, vectors = shipped_embeddings("scifact")
    texts = {d.id: d.text for d in iter_corpus(DATA / "scifact" / "corpus.jsonl")}
    running = RunningServer(tmp_path / "served", api_keys=[ADMIN_KEY])
    client = running.client()
    try:
        col = client.create_collection("s", encoder=None, dim=384, codec="int8")
        col.upsert(ids[:200], vectors=vectors[:200], texts=[texts[i] for i in ids[:200]])
        local = nestvec.connect(tmp_path / "local").create_collection("s", encoder=None, dim=384, codec="int8")
        local.upsert(ids[:200], vectors=vectors[:200], texts=[texts[i] for i in ids[:200]])
        remote_answer = RAG(col, tiny_lm, k=2, max_new_tokens=16, mode="lexical").answer_iterative(
            QUESTION, stride=4, query_words=3)
        local_answer = RAG(local, tiny_lm, k=2, max_new_tokens=16, mode="lexical").answer_iterative(
            QUESTION, stride=4, query_words=3)
        assert remote_answer.text == local_answer.text
        assert [p.id for p in remote_answer.passages] == [p.id for p in local_answer.passages]
    finally:
        client.close()
        running.stop()
