"""One API, two transports: the same calls and the same errors, embedded and over gRPC."""

from __future__ import annotations

import numpy as np
import pytest

from nestvec.client.base import ClientBase
from nestvec.datasets import iter_corpus
from nestvec.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from realdata import DATA, shipped_embeddings

IDS, VECTORS = shipped_embeddings("scifact")


def _filled(client: ClientBase, n: int = 300):  # type: ignore[no-untyped-def]
    col = client.create_collection("sci", encoder=None, dim=384, codec="fp8")
    col.upsert(IDS[:n], vectors=VECTORS[:n], texts=[f"text {i}" for i in range(n)],
               metadata=[{"year": 2000 + i % 10, "even": i % 2 == 0} for i in range(n)])
    return col


def test_collections_lifecycle(any_client: ClientBase) -> None:
    _filled(any_client, 10)
    assert any_client.list_collections() == ["sci"]
    with pytest.raises(AlreadyExistsError):
        any_client.create_collection("sci", encoder=None, dim=384)
    with pytest.raises(NotFoundError, match="nope"):
        any_client.get_collection("nope")
    info = any_client.get_collection("sci").info()
    assert info["count"] == 10 and info["codec"] == "fp8" and info["bytes_per_vector"] == 384
    any_client.drop_collection("sci")
    assert any_client.list_collections() == []


def test_points_round_trip(any_client: ClientBase) -> None:
    col = _filled(any_client)
    assert col.count() == 300
    hits = col.search(VECTORS[5], k=3)
    assert hits[0].id == IDS[5] and hits[0].text == "text 5" and hits[0].metadata == {"year": 2005, "even": False}
    batch = col.search_batch(VECTORS[10:14], k=2, filter={"even": True})
    assert [len(h) for h in batch] == [2, 2, 2, 2] and all(h.metadata["even"] for hits in batch for h in hits)
    assert batch[0][0].id == IDS[10]
    records = col.get([IDS[1], "missing"])
    assert records[0] is not None and records[0].text == "text 1" and records[1] is None
    assert col.delete([IDS[1], "missing"]) == 1 and col.count() == 299


def test_text_queries_are_encoded_where_the_collection_lives(any_client: ClientBase) -> None:
    col = any_client.create_collection("texts", codec="fp16")
    col.upsert(["a", "b"], texts=["Shock waves on a swept wing.", "Gene expression in mouse liver."])
    assert col.search("supersonic aerodynamics", k=1)[0].id == "a"
    assert [h[0].id for h in col.search_batch(["liver genes", "wing shock"], k=1)] == ["b", "a"]


@pytest.mark.parametrize(("call", "error", "field"), [
    (lambda c: c.upsert(["x"], vectors=np.ones((1, 5))), InvalidArgumentError, "vectors"),
    (lambda c: c.upsert(["x", "y"], vectors=np.array([np.ones(384), np.full(384, np.nan)])), InvalidArgumentError,
     "vectors[1]"),
    (lambda c: c.upsert(["x", "x"], vectors=np.ones((2, 384))), InvalidArgumentError, "ids"),
    (lambda c: c.upsert([], vectors=None), InvalidArgumentError, "ids"),
    (lambda c: c.search(np.ones(384), k=0), InvalidArgumentError, "k"),
    (lambda c: c.search(np.ones(384), k=10_001), InvalidArgumentError, "k"),
    (lambda c: c.search(np.ones(384), k=5, filter={"nofield": 1}), InvalidArgumentError, "filter.nofield"),
    (lambda c: c.search(np.ones(384), k=5, filter={"year": {"$near": 1}}), InvalidArgumentError, "filter.year.$near"),
    (lambda c: c.search(np.ones(384), k=5, model="all-mpnet-base-v2"), FailedPreconditionError, None),
    (lambda c: c.upsert(["t"], texts=["needs an encoder"]), FailedPreconditionError, None),
])
def test_same_errors_on_both_transports_and_nothing_changes(any_client: ClientBase, call, error, field) -> None:  # type: ignore[no-untyped-def]
    col = _filled(any_client, 50)
    before = ([(h.id, h.score) for h in col.search(VECTORS[0], k=10)], col.count(), col.get(IDS[:50]))
    with pytest.raises(error) as raised:
        call(col)
    if field is not None:
        assert raised.value.field == field and str(raised.value).startswith(field)
    assert ([(h.id, h.score) for h in col.search(VECTORS[0], k=10)], col.count(), col.get(IDS[:50])) == before


@pytest.mark.parametrize("nprobe", [-1, 70_000, 2.5])
def test_bad_nprobe_is_the_same_error_in_both_modes(any_client: ClientBase, nprobe: object) -> None:
    col = _filled(any_client, 20)
    with pytest.raises(InvalidArgumentError) as err:
        col.search(VECTORS[0], k=3, nprobe=nprobe)  # type: ignore[arg-type]
    assert err.value.field == "nprobe"
    assert col.search(VECTORS[0], k=3, nprobe=8)[0].id == IDS[0]  # the flat index takes and ignores it


def test_index_choice_travels(any_client: ClientBase) -> None:
    col = any_client.create_collection("spann", encoder=None, dim=384, index="spann")
    col.upsert(IDS[:1500], vectors=VECTORS[:1500])
    assert col.info()["index"]["kind"] == "spann"
    assert col.search(VECTORS[7], k=1, nprobe=16)[0].id == IDS[7]
    with pytest.raises(AlreadyExistsError, match="index"):
        any_client.create_collection("spann", encoder=None, dim=384, index="flat", exist_ok=True)
    with pytest.raises(InvalidArgumentError) as err:
        any_client.create_collection("other", encoder=None, dim=384, index="hnsw")
    assert err.value.field == "index"


def test_lexical_and_hybrid_search_over_both_transports(any_client: ClientBase) -> None:
    """Real SciFact texts with their shipped vectors: each mode, the component scores and ranks,
    a filter on both sides, and the same errors embedded and over gRPC."""
    texts = {d.id: d.text for d in iter_corpus(DATA / "scifact" / "corpus.jsonl")}
    n = 300
    col = any_client.create_collection("hyb", encoder=None, dim=384, codec="int8")
    col.upsert(IDS[:n], vectors=VECTORS[:n], texts=[texts[i] for i in IDS[:n]],
               metadata=[{"even": i % 2 == 0} for i in range(n)])
    query, vector = texts[IDS[7]][:80], VECTORS[7]
    lexical = col.search(query, k=5, mode="lexical")
    assert lexical[0].id == IDS[7] and lexical[0].lexical_rank == 1 and lexical[0].dense_rank is None
    assert lexical[0].score == pytest.approx(lexical[0].lexical_score)
    hybrid = col.search(query, k=5, vector=vector, mode="hybrid")
    top = hybrid[0]
    assert top.id == IDS[7] and top.dense_rank == 1 and top.lexical_rank == 1 and top.score == pytest.approx(1.0)
    assert top.dense_score == pytest.approx(1.0, abs=0.02) and top.lexical_score > 0
    rrf = col.search(query, k=5, vector=vector, mode="hybrid", fusion="rrf", rrf_k=10)
    assert rrf[0].id == IDS[7] and rrf[0].score == pytest.approx(2 / 11)
    even = col.search_batch([query, texts[IDS[8]][:80]], k=5, vectors=VECTORS[7:9], filter={"even": True},
                            mode="hybrid", alpha=0.3)
    assert [len(row) for row in even] == [5, 5] and even[1][0].id == IDS[8]
    assert all(h.metadata["even"] for row in even for h in row) and IDS[7] not in [h.id for h in even[0]]
    dense = col.search(vector, k=3)
    assert dense[0].id == IDS[7] and dense[0].lexical_rank is None
    for kwargs, field in [({"mode": "sparse"}, "mode"), ({"mode": "hybrid", "fusion": "max"}, "fusion"),
                          ({"mode": "hybrid", "alpha": 1.5}, "alpha"), ({"mode": "hybrid", "rrf_k": 0}, "rrf_k")]:
        with pytest.raises(InvalidArgumentError, match=field):
            col.search(query, k=3, vector=vector, **kwargs)
    with pytest.raises(InvalidArgumentError, match="query"):
        col.search(vector, k=3, mode="lexical")
    with pytest.raises(InvalidArgumentError, match="vectors"):
        col.search_batch([query], k=3, vectors=VECTORS[:2], mode="hybrid")
    assert len(col.search('AND ( title: "cell*', k=3, mode="lexical")) == 3  # searched as plain words
    assert col.search("  ", k=3, mode="lexical") == []


def test_hits_carry_their_stored_vectors_when_asked(any_client: ClientBase) -> None:
    """with_vectors (as in Qdrant): each hit's vector decoded from its codes, on both transports,
    also for hits only the lexical side found; absent unless asked."""
    col = _filled(any_client, 50)
    plain = col.search(VECTORS[3], k=4)
    assert all(h.vector is None for h in plain)
    hits = col.search(VECTORS[3], k=4, with_vectors=True)
    assert [h.id for h in hits] == [h.id for h in plain]
    for hit in hits:
        assert hit.vector is not None and hit.vector.dtype == np.float32 and hit.vector.shape == (384,)
        truth = VECTORS[IDS.index(hit.id)]
        assert float(hit.vector @ truth) / float(np.linalg.norm(hit.vector)) > 0.99  # fp8: close, not exact
        assert float(hit.vector @ VECTORS[3]) == pytest.approx(hit.score, abs=0.02)
    rows = col.search_batch(["text 7", "text 9"], k=3, vectors=VECTORS[7:9], mode="hybrid", with_vectors=True)
    assert all(h.vector is not None for row in rows for h in row)
