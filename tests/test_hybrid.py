"""Lexical and hybrid search on a real SciFact slice: each mode, filters on both sides, deletes
gone from both, reopen, a crash between the two stores' commits, and bad input."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nestvec
from nestvec.datasets import iter_corpus
from nestvec.errors import InvalidArgumentError
from realdata import DATA, shipped_embeddings

N = 400


@pytest.fixture(scope="module")
def scifact() -> tuple[list[str], list[str], np.ndarray]:
    ids, vectors = shipped_embeddings("scifact")
    texts = {d.id: d.text for d in iter_corpus(DATA / "scifact" / "corpus.jsonl")}
    return ids[:N], [texts[i] for i in ids[:N]], np.ascontiguousarray(vectors[:N], dtype=np.float32)


def _collection(tmp_path: Path, scifact: tuple[list[str], list[str], np.ndarray]) -> Any:
    ids, texts, vectors = scifact
    col = nestvec.connect(tmp_path).create_collection("s", encoder=None, dim=384, codec="int8")
    col.upsert(ids, vectors=vectors, texts=texts, metadata=[{"half": i % 2} for i in range(N)])
    # no encoder: a text query's vector is that of the document it was taken from
    by_text = {t[:60]: v for t, v in zip(texts, vectors, strict=True)}
    col.embed_queries = lambda qs, model=None: np.stack([by_text[q[:60]] for q in qs])
    return col


def test_each_mode_finds_the_document_a_passage_came_from(
        tmp_path: Path, scifact: tuple[list[str], list[str], np.ndarray]) -> None:
    ids, texts, _ = scifact
    col = _collection(tmp_path, scifact)
    for i in (3, 77, 250):
        query = texts[i][:60]
        lexical = col.search(query, k=5, mode="lexical")
        assert lexical[0].id == ids[i] and lexical[0].lexical_rank == 1 and lexical[0].dense_rank is None
        assert lexical[0].score == lexical[0].lexical_score > 0 and lexical[0].text == texts[i]
        for fusion in ("rrf", "weighted"):
            hybrid = col.search(query, k=5, mode="hybrid", fusion=fusion)
            top = hybrid[0]
            assert top.id == ids[i] and top.dense_rank == 1 and top.lexical_rank == 1
            assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)
        rrf = col.search(query, k=5, mode="hybrid", fusion="rrf", rrf_k=60)[0]
        assert rrf.score == pytest.approx(2 / 61)
        dense = col.search(query, k=5)
        assert dense[0].id == ids[i] and dense[0].lexical_rank is None


def test_filters_apply_to_both_sides_and_deletes_leave_both(
        tmp_path: Path, scifact: tuple[list[str], list[str], np.ndarray]) -> None:
    ids, texts, _ = scifact
    col = _collection(tmp_path, scifact)
    query = texts[10][:60]
    odd_only = col.search(query, k=10, mode="hybrid", filter={"half": 1})
    assert odd_only and all(h.metadata["half"] == 1 for h in odd_only) and ids[10] not in [h.id for h in odd_only]
    assert all(h.metadata["half"] == 1 for h in col.search(query, k=10, mode="lexical", filter={"half": 1}))
    col.delete([ids[10]])
    for mode in ("dense", "lexical", "hybrid"):
        assert ids[10] not in [h.id for h in col.search(query, k=10, mode=mode)]
    col.upsert([ids[10]], vectors=scifact[2][10:11], texts=["graphene superconductivity at room temperature"])
    assert col.search("room temperature graphene", k=1, mode="lexical")[0].id == ids[10]
    assert ids[10] not in [h.id for h in col.search(query, k=10, mode="lexical")]  # the old text is gone


def test_reopen_and_a_crash_between_the_two_commits(
        tmp_path: Path, scifact: tuple[list[str], list[str], np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    ids, texts, vectors = scifact
    client = nestvec.connect(tmp_path)
    col = client.create_collection("s", encoder=None, dim=384, codec="int8")
    col.upsert(ids[:200], vectors=vectors[:200], texts=texts[:200])

    def die(*args: object) -> None:
        raise KeyboardInterrupt("killed after the LMDB commit, before the lexical one")

    monkeypatch.setattr(type(col), "_apply_lexical", die)
    with pytest.raises(KeyboardInterrupt):
        col.upsert(ids[200:300], vectors=vectors[200:300], texts=texts[200:300])
    with pytest.raises(KeyboardInterrupt):
        col.delete(ids[:50])
    monkeypatch.undo()
    client.close()
    reopened = nestvec.connect(tmp_path).get_collection("s")
    assert reopened.count() == 250
    assert reopened.search(texts[250][:60], k=1, mode="lexical")[0].id == ids[250]  # replayed on open
    assert ids[5] not in [h.id for h in reopened.search(texts[5][:60], k=10, mode="lexical")]
    assert reopened.store.meta_items(b"lexical_log/") == []


@pytest.mark.parametrize("query", ['"unclosed', "title:(a OR b", "AND OR NOT", "cell* ~2 ^3 [x TO y]", "a:b:c",
                                   "CRF01_1b2k protein", "naïve café-au-lait ﬁbre क़िला"])
def test_query_syntax_is_searched_as_plain_words(
        tmp_path: Path, scifact: tuple[list[str], list[str], np.ndarray], query: str) -> None:
    col = _collection(tmp_path, scifact)
    hits = col.search(query, k=3, mode="lexical")
    assert isinstance(hits, list)  # no parse error
    assert col.search("   ", k=3, mode="lexical") == [] and col.search("?!", k=3, mode="lexical") == []


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"mode": "sparse"}, "mode"), ({"mode": "hybrid", "fusion": "max"}, "fusion"),
    ({"mode": "hybrid", "alpha": 1.5}, "alpha"), ({"mode": "hybrid", "alpha": -0.1}, "alpha"),
    ({"mode": "hybrid", "rrf_k": 0}, "rrf_k"),
])
def test_bad_search_settings_name_the_field(
        tmp_path: Path, scifact: tuple[list[str], list[str], np.ndarray], kwargs: dict[str, Any], field: str) -> None:
    col = _collection(tmp_path, scifact)
    with pytest.raises(InvalidArgumentError, match=field):
        col.search("cells", k=3, **kwargs)
    with pytest.raises(InvalidArgumentError, match="query"):
        col.search(scifact[2][0], k=3, mode="lexical")


def test_cli_search_and_eval_take_the_mode(tmp_path: Path, scifact: tuple[list[str], list[str], np.ndarray],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from nestvec.cli import main

    ids, texts, vectors = scifact
    client = nestvec.connect(tmp_path)
    client.create_collection("s", encoder=None, dim=384, codec="int8").upsert(ids, vectors=vectors, texts=texts)
    client.close()
    assert main(["--data", str(tmp_path), "search", "s", texts[42][:60], "--mode", "lexical", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert f"[{ids[42]}]" in out.splitlines()[0] and "lexical #1" in out
    assert main(["--data", str(tmp_path), "search", "s", "cells", "--mode", "hybrid", "--alpha", "2"]) != 0
    assert "alpha" in capsys.readouterr().err


_WRITER = """
import json, sys
import numpy as np
import nestvec
col = nestvec.connect(sys.argv[1]).get_collection("s")
vectors, rng, live = np.load(sys.argv[2]), np.random.default_rng(int(sys.argv[3])), []
for step in range(100_000):
    if step % 3 == 2 and len(live) > 8:
        gone = [live.pop(int(i)) for i in sorted(rng.choice(len(live), 3, replace=False), reverse=True)]
        print("next del", json.dumps(gone), flush=True)
        col.delete(gone)
        print("acked", flush=True)
    else:
        ids = [f"t{sys.argv[3]}s{step}n{i}" for i in range(4)]
        print("next put", json.dumps(ids), flush=True)
        col.upsert(ids, vectors=vectors[rng.choice(len(vectors), 4)], texts=[f"word{step} marker{i}" for i in ids])
        live += ids
        print("acked", flush=True)
"""


def test_killed_writers_leave_both_stores_agreeing(tmp_path: Path, scifact: tuple[list[str], list[str], np.ndarray]
                                                   ) -> None:
    """A subprocess upserts and deletes until SIGKILLed at a random moment, three times: after
    each reopen the lexical index holds exactly the vector store's ids, every acknowledged write is
    there, and the one in flight is either wholly there or wholly absent."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from realdata import REPO

    ids, texts, vectors = scifact
    np.save(tmp_path / "v.npy", vectors)
    client = nestvec.connect(tmp_path / "data")
    client.create_collection("s", encoder=None, dim=384, codec="int8").upsert(ids[:50], vectors=vectors[:50],
                                                                             texts=texts[:50])
    client.close()
    expected_present, expected_absent = set(ids[:50]), set()
    rng = np.random.default_rng(7)
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "data"), str(tmp_path / "v.npy"),
                                 str(trial)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        time.sleep(float(rng.uniform(2.0, 4.0)))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        # A kill in the middle of a print leaves a partial last line: that operation never started
        # (writes take ~1 ms since lexical commits are grouped, so the kill often lands in one).
        lines = out.splitlines() if out.endswith("\n") else out.splitlines()[:-1]
        acked = 0
        in_flight: tuple[str, list[str]] | None = None
        for line in lines:
            if line.startswith("next "):
                kind, payload = line[5:8], json.loads(line[9:])
                in_flight = (kind, payload)
            elif line == "acked" and in_flight is not None:
                kind, payload = in_flight
                if kind == "put":
                    expected_present |= set(payload)
                    expected_absent -= set(payload)
                else:
                    expected_present -= set(payload)
                    expected_absent |= set(payload)
                in_flight, acked = None, acked + 1
        assert acked >= 3, f"trial {trial}: the writer acknowledged only {acked} writes before the kill"
        col = nestvec.connect(tmp_path / "data").get_collection("s")
        vector_ids = set(col._row_of)
        assert col.lexical.ids() == vector_ids, f"trial {trial}: the two stores disagree"
        maybe_gone = set(in_flight[1]) if in_flight is not None and in_flight[0] == "del" else set()
        assert expected_present - maybe_gone <= vector_ids and not expected_absent & vector_ids
        if in_flight is not None:  # committed whole or not at all
            kind, payload = in_flight
            there = [i in vector_ids for i in payload]
            assert all(there) or not any(there)
        for key in sorted(expected_present - set(ids))[:5]:
            assert col.search(f"word{key.split('s')[1].split('n')[0]}", k=8, mode="lexical")
        nestvec.connect(tmp_path / "data").close()
        col.close()
        expected_present, expected_absent = vector_ids, expected_absent - vector_ids


def test_hybrid_takes_the_callers_query_vectors(tmp_path: Path, scifact: tuple[list[str], list[str], np.ndarray],
                                                ) -> None:
    """A collection of caller-made vectors (no encoder) searched in hybrid mode: the caller gives
    each query's text for BM25 and its vector for the dense side. The default fusion is weighted 0.5."""
    ids, texts, vectors = scifact
    col = nestvec.connect(tmp_path).create_collection("v", encoder=None, dim=384, codec="int8")
    col.upsert(ids, vectors=vectors, texts=texts)
    queries = [texts[i][:60] for i in (3, 77, 250)]
    given = col.search_batch(queries, k=5, vectors=vectors[[3, 77, 250]], mode="hybrid")
    assert [row[0].id for row in given] == [ids[3], ids[77], ids[250]]
    assert all(row[0].dense_rank == 1 and row[0].lexical_rank == 1 for row in given)
    explicit = col.search_batch(queries, k=5, vectors=vectors[[3, 77, 250]], mode="hybrid", fusion="weighted",
                                alpha=0.5)
    assert [[(h.id, h.score) for h in row] for row in given] == [[(h.id, h.score) for h in row] for row in explicit]
    assert [(h.id, h.score) for h in col.search(queries[0], k=5, vector=vectors[3], mode="hybrid")] == \
        [(h.id, h.score) for h in given[0]]
    with pytest.raises(InvalidArgumentError, match="vectors"):
        col.search_batch(queries, k=5, vectors=vectors[:2], mode="hybrid")
    with pytest.raises(InvalidArgumentError, match="vectors"):
        col.search_batch(vectors[:3], k=5, vectors=vectors[:3])
    with pytest.raises(InvalidArgumentError, match="queries"):
        col.search_batch([], k=5, mode="lexical")
