"""Embedded collections: persistence, upsert/delete/get semantics, filters, search, lifecycle."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

import nestvec
from nestvec.client.local import LocalClient
from nestvec.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError


def _vectors(scifact_vectors: tuple[list[str], np.ndarray], n: int) -> tuple[list[str], np.ndarray]:
    ids, vectors = scifact_vectors
    return ids[:n], vectors[:n]


def test_upsert_search_get_and_reopen(tmp_path: Path, scifact_vectors: tuple[list[str], np.ndarray]) -> None:
    ids, vecs = _vectors(scifact_vectors, 1500)
    meta = [{"year": 2000 + i % 20, "source": ["pubmed", "arxiv"][i % 2]} for i in range(1500)]
    with nestvec.connect(tmp_path) as client:
        col = client.create_collection("sci", encoder=None, dim=384, codec="fp8")
        assert col.upsert(ids, texts=[f"doc {i}" for i in ids], vectors=vecs, metadata=meta) == 1500
        before = col.search(vecs[7], k=5)
        assert before[0].id == ids[7] and before[0].text == f"doc {ids[7]}"
        assert before[0].metadata == meta[7]
    with nestvec.connect(tmp_path) as client:
        col = client.get_collection("sci")
        assert col.count() == 1500 and col.codec.fitted and col.info()["staged_vectors"] == 0
        after = col.search(vecs[7], k=5)
        assert [(h.id, h.score) for h in after] == [(h.id, h.score) for h in before]
        assert client.list_collections() == ["sci"]


def test_search_matches_brute_force(client: LocalClient, scifact_vectors: tuple[list[str], np.ndarray]) -> None:
    ids, vecs = _vectors(scifact_vectors, 1000)
    col = client.create_collection("exact", encoder=None, dim=384, codec="fp32")
    col.upsert(ids, vectors=vecs)
    queries = scifact_vectors[1][2000:2020]
    results = col.search_batch(queries, k=10)
    expected = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    for hits, rows in zip(results, expected, strict=True):
        assert [h.id for h in hits] == [ids[r] for r in rows]
        assert all(a.score >= b.score for a, b in itertools.pairwise(hits))


def test_upsert_replaces_and_delete_removes(client: LocalClient, scifact_vectors: tuple[list[str], np.ndarray]) -> None:
    ids, vecs = _vectors(scifact_vectors, 50)
    col = client.create_collection("c", encoder=None, dim=384, codec="fp8")
    col.upsert(ids, vectors=vecs, texts=["old"] * 50, metadata=[{"v": 1}] * 50)
    col.upsert([ids[0]], vectors=vecs[10:11], texts=["new"], metadata=[{"v": 2}])
    assert col.count() == 50
    record = col.get([ids[0]])[0]
    assert record is not None and record.text == "new" and record.metadata == {"v": 2}
    hits = col.search(vecs[10], k=2)
    assert {h.id for h in hits} == {ids[0], ids[10]}
    assert col.search(vecs[0], k=50, filter={"v": 2})[0].id == ids[0]
    assert col.delete([ids[0], "never-existed"]) == 1
    assert col.get([ids[0], ids[1]])[0] is None and col.count() == 49
    assert ids[0] not in {h.id for h in col.search(vecs[10], k=49)}
    assert col.delete([ids[0]]) == 0


def test_compaction_after_many_deletes_keeps_results(client: LocalClient,
                                                     scifact_vectors: tuple[list[str], np.ndarray]) -> None:
    ids, vecs = _vectors(scifact_vectors, 3000)
    col = client.create_collection("big", encoder=None, dim=384, codec="fp16")
    col.upsert(ids, vectors=vecs, metadata=[{"i": i} for i in range(3000)])
    col.delete(ids[:2000])
    assert col.index.rows == 1000 and col.count() == 1000  # tombstones were compacted away
    hits = col.search(vecs[2500], k=3, filter={"i": {"$gte": 2500}})
    assert hits[0].id == ids[2500] and all(h.metadata["i"] >= 2500 for h in hits)


def test_filters(client: LocalClient, scifact_vectors: tuple[list[str], np.ndarray]) -> None:
    ids, vecs = _vectors(scifact_vectors, 200)
    meta = [{"year": 2000 + i % 10, "lang": ["en", "de", "fr"][i % 3], "ok": i % 2 == 0} for i in range(200)]
    meta[5]["note"] = "only here"
    col = client.create_collection("f", encoder=None, dim=384, codec="fp32")
    col.upsert(ids, vectors=vecs, metadata=meta)

    def matching(flt: dict) -> set[str]:
        return {h.id for h in col.search(vecs[0], k=200, filter=flt)}

    def expect(pred) -> set[str]:  # type: ignore[no-untyped-def]
        return {ids[i] for i in range(200) if pred(meta[i])}

    assert matching({"lang": "de"}) == expect(lambda m: m["lang"] == "de")
    assert matching({"year": {"$gte": 2005, "$lt": 2008}}) == expect(lambda m: 2005 <= m["year"] < 2008)
    assert matching({"lang": {"$in": ["en", "fr"]}}) == expect(lambda m: m["lang"] in ("en", "fr"))
    assert matching({"lang": {"$nin": ["en"]}, "ok": True}) == expect(lambda m: m["lang"] != "en" and m["ok"])
    assert matching({"$or": [{"year": 2001}, {"lang": {"$ne": "en"}}]}) == expect(
        lambda m: m["year"] == 2001 or m["lang"] != "en")
    assert matching({"$and": [{"year": {"$gt": 2003}}, {"year": {"$lte": 2004}}]}) == expect(lambda m: m["year"] == 2004)
    assert matching({"note": "only here"}) == {ids[5]}
    assert matching({"ok": 1}) == set()  # booleans are not numbers
    assert col.search(vecs[0], k=5, filter={"year": 1999}) == []


def test_rescoring_codec_rereads_floats_from_disk(client: LocalClient,
                                                  scifact_vectors: tuple[list[str], np.ndarray]) -> None:
    ids, vecs = _vectors(scifact_vectors, 2000)
    col = client.create_collection("bin", encoder=None, dim=384, codec="binary+rescore")
    col.upsert(ids, vectors=vecs)
    queries = scifact_vectors[1][3000:3030]
    exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    results = col.search_batch(queries, k=10, rescore_candidates=100)
    recall = np.mean([len({h.id for h in hits} & {ids[r] for r in row}) / 10
                      for hits, row in zip(results, exact, strict=True)])
    assert recall > 0.95
    # rescored scores are the float inner products
    assert abs(results[0][0].score - float(np.max(queries[0] @ vecs.T))) < 1e-4


def test_lifecycle_errors(client: LocalClient) -> None:
    client.create_collection("one", encoder=None, dim=8, codec="fp32")
    with pytest.raises(AlreadyExistsError):
        client.create_collection("one", encoder=None, dim=8, codec="fp32")
    assert client.create_collection("one", encoder=None, dim=8, codec="fp32", exist_ok=True).name == "one"
    with pytest.raises(NotFoundError, match="nope"):
        client.get_collection("nope")
    client.drop_collection("one")
    assert client.list_collections() == []
    with pytest.raises(NotFoundError):
        client.drop_collection("one")


def test_text_collection_end_to_end(client: LocalClient) -> None:
    col = client.create_collection("texts", codec="fp8")
    col.upsert(["a", "b", "c"], texts=["Graphene has high thermal conductivity.",
                                        "Mice hibernate in cold winters.", ""])
    assert col.config.encoder is not None and col.config.encoder.model == "all-MiniLM-L6-v2"
    assert col.search("heat transport in carbon materials", k=1)[0].id == "a"
    info = col.info()
    assert info["count"] == 3 and info["bytes_per_vector"] == 384 and info["compression_ratio"] == 4.0


def test_small_collections_stay_exact_until_the_codec_is_fitted(tmp_path: Path,
                                                                scifact_vectors: tuple[list[str], np.ndarray]) -> None:
    ids, vecs = _vectors(scifact_vectors, 1100)
    with nestvec.connect(tmp_path) as client:
        col = client.create_collection("i8", encoder=None, dim=384, codec="int8")
        col.upsert(ids[:3], vectors=vecs[:3])  # far too few to fit per-dimension ranges: staged as float32
        assert not col.codec.fitted and col.info()["staged_vectors"] == 3
        assert col.search(vecs[1], k=1)[0].score == pytest.approx(1.0, abs=1e-6)
        col.upsert(ids[3:1000], vectors=vecs[3:1000])
        col.delete(ids[:2])
    with nestvec.connect(tmp_path) as client:  # staged vectors survive a reopen
        col = client.get_collection("i8")
        assert col.info()["staged_vectors"] == 998 and col.count() == 998
        col.upsert(ids[1000:1100], vectors=vecs[1000:1100])  # crosses the threshold: fit on all, re-encode
        assert col.codec.fitted and col.info()["staged_vectors"] == 0 and col.count() == 1098
        hits = col.search(vecs[500], k=3)
        assert hits[0].id == ids[500] and abs(hits[0].score - 1.0) < 0.02
        assert col.get([ids[0]]) == [None]
        with pytest.raises(FailedPreconditionError, match="already holds codes"):
            col.fit_codec(vecs)
    with nestvec.connect(tmp_path) as client:
        col = client.get_collection("i8")
        assert col.codec.fitted and col.count() == 1098 and col.search(vecs[500], k=1)[0].id == ids[500]


def test_fit_codec_on_a_sample_converts_staged_vectors(client: LocalClient,
                                                      scifact_vectors: tuple[list[str], np.ndarray]) -> None:
    ids, vecs = _vectors(scifact_vectors, 2000)
    col = client.create_collection("p", encoder=None, dim=384, codec="pca64+fp8")
    col.upsert(ids[:10], vectors=vecs[:10])
    with pytest.raises(FailedPreconditionError, match="at least 64"):
        col.fit_codec(vecs[:20])
    assert col.info()["staged_vectors"] == 10
    col.fit_codec(vecs)
    assert col.codec.fitted and col.index.codes().shape == (10, 64)
    assert col.search(vecs[4], k=1)[0].id == ids[4]


def test_exist_ok_checks_settings_and_dropped_handles_fail_cleanly(client: LocalClient) -> None:
    col = client.create_collection("s", encoder=None, dim=8, codec="fp16")
    assert client.create_collection("s", encoder=None, dim=8, codec="fp16", exist_ok=True) is col
    for kwargs, problem in (({"dim": 16}, "dim 8"), ({"codec": "int8"}, "codec"),
                            ({"encoder": "all-MiniLM-L6-v2"}, "encoder")):
        with pytest.raises(AlreadyExistsError, match=problem):
            client.create_collection("s", **{"encoder": None, "dim": 8, "codec": "fp16", **kwargs}, exist_ok=True)
    col.upsert(["a"], vectors=np.ones((1, 8)))
    client.drop_collection("s")
    for call in (col.count, lambda: col.search(np.ones(8), k=1), lambda: col.upsert(["b"], vectors=np.ones((1, 8)))):
        with pytest.raises(NotFoundError, match="dropped"):
            call()
