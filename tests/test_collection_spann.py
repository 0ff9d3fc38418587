"""Collections on the SPANN index, on a real wiki250k slice: the index is chosen, built, flushed,
purged, rebuilt and reopened, and always agrees with brute force over what the store holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import nestvec
import nestvec.collection
from nestvec.collection import Collection
from nestvec.errors import FailedPreconditionError, InvalidArgumentError
from nestvec.index.buffered import BufferedSpann
from realdata import DATA

N = 6000


@pytest.fixture(scope="module")
def wiki() -> tuple[np.ndarray, np.ndarray]:
    base = np.load(DATA / "wiki250k" / "minilm_base150k_fp16.npy", mmap_mode="r")[:N].astype(np.float32)
    queries = np.load(DATA / "wiki250k" / "minilm_queries_fp16.npy")[:100].astype(np.float32)
    return base / np.linalg.norm(base, axis=1, keepdims=True), queries / np.linalg.norm(queries, axis=1, keepdims=True)


@pytest.fixture(autouse=True)
def small_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nestvec.collection, "FLUSH_ROWS", 700)  # several flushes within the slice


def _recall(col: Collection, queries: np.ndarray, vectors: dict[str, np.ndarray], k: int = 10,
            flt: dict | None = None, keep: set[str] | None = None) -> float:
    keys = [key for key in vectors if keep is None or key in keep]
    matrix = np.stack([vectors[key] for key in keys])
    exact = np.argsort(-(queries @ matrix.T), axis=1)[:, :k]
    found = col.search_batch(queries, k, flt)
    return float(np.mean([len({h.id for h in hits} & {keys[i] for i in row}) / k
                          for hits, row in zip(found, exact.tolist(), strict=True)]))


def _fill(col: Collection, base: np.ndarray, lo: int, hi: int, batch: int = 500) -> dict[str, np.ndarray]:
    for start in range(lo, hi, batch):
        stop = min(start + batch, hi)
        col.upsert([f"d{i}" for i in range(start, stop)], vectors=base[start:stop],
                   metadata=[{"bucket": i % 20, "half": i % 2} for i in range(start, stop)])
    return {f"d{i}": base[i] for i in range(lo, hi)}


def test_spann_collection_builds_flushes_and_reopens(tmp_path: Path, wiki: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = wiki
    client = nestvec.connect(tmp_path)
    col = client.create_collection("w", encoder=None, dim=384, codec="int8", index="spann")
    stored = _fill(col, base, 0, 1000)
    assert col.info()["index"]["kind"] == "flat"  # exact and staged until the codec can be fitted
    stored.update(_fill(col, base, 1000, 1500))
    assert col.info()["index"]["kind"] == "spann"  # built as soon as the codec was fitted
    stored.update(_fill(col, base, 1500, N))
    info = col.info()["index"]
    assert info["built_count"] >= 1024 and info["buffered"] < 700 and col.count() == N
    recall = _recall(col, queries, stored)
    assert recall >= 0.9, recall
    before = [[h.id for h in hits] for hits in col.search_batch(queries, 10)]
    client.close()
    reopened = nestvec.connect(tmp_path).get_collection("w")
    assert reopened.count() == N and reopened.info()["index"] == info
    assert [[h.id for h in hits] for hits in reopened.search_batch(queries, 10)] == before
    one = reopened.search(queries[0], 10)  # the single-query path agrees with the batched one
    assert [h.id for h in one] == before[0]


def test_replaced_and_deleted_vectors_never_come_back(tmp_path: Path, wiki: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = wiki
    client = nestvec.connect(tmp_path)
    col = client.create_collection("w", encoder=None, dim=384, codec="int8", index="spann")
    stored = _fill(col, base, 0, 4000)
    rng = np.random.default_rng(0)
    # the ids of the queries' true neighbours are the ones most likely to leak back: move and delete those
    nearest = {h.id for hits in col.search_batch(queries[:40], 10) for h in hits}
    moved = sorted(nearest)[: len(nearest) // 2]
    deleted = sorted(nearest - set(moved))
    deleted += sorted({f"d{i}" for i in rng.choice(4000, 500, replace=False)} - nearest)
    donors = base[4000:4000 + len(moved)]
    col.upsert(moved, vectors=donors)
    stored.update(dict(zip(moved, donors, strict=True)))
    assert col.delete(deleted) == len(deleted)
    for key in deleted:
        stored.pop(key, None)
    assert col.info()["index"]["tombstones"] >= len(moved)
    stored.update(_fill(col, base, 4100, N))  # more flushes (and purges) after the deletes
    assert all(hit.id in stored for hits in col.search_batch(queries, 20) for hit in hits)
    old_vector = base[int(moved[0][1:])]
    for hit in col.search(old_vector, 20):  # a replaced id scores as its new vector, never its old one
        assert hit.id != moved[0] or hit.score < 0.99
    assert col.search(donors[0], 1)[0].id == moved[0]
    gone = set(deleted) - set(moved)
    assert not gone & {h.id for hits in col.search_batch(queries, 50) for h in hits}
    assert _recall(col, queries, stored) >= 0.9
    client.close()
    reopened = nestvec.connect(tmp_path).get_collection("w")
    assert reopened.count() == len(stored)
    assert not gone & {h.id for hits in reopened.search_batch(queries, 50) for h in hits}


def test_rebuild_after_growth_and_auto_switch(tmp_path: Path, wiki: tuple[np.ndarray, np.ndarray],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    base, queries = wiki
    monkeypatch.setattr(nestvec.collection, "SPANN_AUTO_MIN", 1500)
    client = nestvec.connect(tmp_path)
    col = client.create_collection("a", encoder=None, dim=384, codec="int8")  # index="auto"
    stored = _fill(col, base, 0, 1000)
    assert col.info()["index"]["kind"] == "flat"
    stored.update(_fill(col, base, 1000, 2000))
    assert col.info()["index"]["kind"] == "spann"
    first_build = col.info()["index"]["built_count"]
    stored.update(_fill(col, base, 2000, N))
    assert col.info()["index"]["built_count"] >= 2 * first_build  # rebuilt once it had doubled
    assert _recall(col, queries, stored) >= 0.9


def test_filtered_search_keeps_recall(tmp_path: Path, wiki: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = wiki
    col = nestvec.connect(tmp_path).create_collection("f", encoder=None, dim=384, codec="int8", index="spann")
    stored = _fill(col, base, 0, N)
    for flt, keep in [({"bucket": 3}, {f"d{i}" for i in range(N) if i % 20 == 3}),       # selective: exact scan
                      ({"half": 1}, {f"d{i}" for i in range(N) if i % 2 == 1})]:          # loose: wider probing
        assert _recall(col, queries, stored, flt=flt, keep=keep) >= 0.9
        assert all(h.id in keep for hits in col.search_batch(queries, 10, flt) for h in hits)


def test_failed_flush_commits_nothing_and_is_retried(tmp_path: Path, wiki: tuple[np.ndarray, np.ndarray],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base, queries = wiki
    client = nestvec.connect(tmp_path)
    col = client.create_collection("c", encoder=None, dim=384, codec="int8", index="spann")
    stored = _fill(col, base, 0, 2000)
    lists_before = col.info()["index"]["lists"]

    def broken(self: BufferedSpann, txn: object) -> None:
        self.spann.postings.write({0: (np.zeros(0, np.int64), np.zeros((0, 384), np.uint8))}, txn)  # type: ignore[arg-type]
        raise OSError("disk went away during the flush")

    monkeypatch.setattr(BufferedSpann, "stage_flush", broken)
    stored.update(_fill(col, base, 2000, 3000))  # the upserts commit; each flush fails and is rolled back
    assert col.info()["index"]["buffered"] > 700 and col.info()["index"]["lists"] == lists_before
    assert _recall(col, queries, stored) >= 0.9  # unflushed vectors are searched in the buffer; list 0 is intact
    client.close()
    reopened = nestvec.connect(tmp_path).get_collection("c")
    assert reopened.count() == len(stored) and reopened.info()["index"]["buffered"] > 700
    monkeypatch.undo()
    monkeypatch.setattr(nestvec.collection, "FLUSH_ROWS", 700)
    stored.update(_fill(reopened, base, 3000, 3100))  # the next write flushes the backlog
    assert reopened.info()["index"]["buffered"] == 0
    assert _recall(reopened, queries, stored) >= 0.9


@pytest.mark.parametrize("nprobe", [-1, 1.5, "8", True, 70_000])
def test_bad_nprobe(tmp_path: Path, wiki: tuple[np.ndarray, np.ndarray], nprobe: object) -> None:
    base, queries = wiki
    col = nestvec.connect(tmp_path).create_collection("b", encoder=None, dim=384, codec="int8", index="spann")
    _fill(col, base, 0, 1200)
    with pytest.raises(InvalidArgumentError) as err:
        col.search(queries[0], 10, nprobe=nprobe)  # type: ignore[arg-type]
    assert err.value.field == "nprobe"
    assert len(col.search(queries[0], 10, nprobe=4)) == 10


def test_bad_index_kind(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        nestvec.connect(tmp_path).create_collection("x", encoder=None, dim=8, index="hnsw")
    assert err.value.field == "index" and not (tmp_path / "x").exists()


def test_rebuild_index_on_demand(tmp_path: Path, wiki: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = wiki
    client = nestvec.connect(tmp_path)
    flat = client.create_collection("flat", encoder=None, dim=384, index="flat")
    _fill(flat, base, 0, 1500)
    with pytest.raises(FailedPreconditionError):
        flat.rebuild_index()
    col = client.create_collection("s", encoder=None, dim=384, index="spann")
    stored = _fill(col, base, 0, 3000)
    col.delete([f"d{i}" for i in range(0, 3000, 7)])
    for i in range(0, 3000, 7):
        stored.pop(f"d{i}")
    col.rebuild_index()
    info = col.info()["index"]
    assert info["built_count"] == len(stored) and info["buffered"] == 0 and info["tombstones"] == 0
    assert _recall(col, queries, stored) >= 0.9
    client.close()
    reopened = nestvec.connect(tmp_path).get_collection("s")
    assert reopened.info()["index"] == info and _recall(reopened, queries, stored) >= 0.9


def test_flush_index_empties_the_write_buffer(tmp_path: Path, wiki: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = wiki
    col = nestvec.connect(tmp_path).create_collection("b", encoder=None, dim=384, index="spann")
    stored = _fill(col, base, 0, 1600)
    assert col.info()["index"]["buffered"] > 0
    col.flush_index()
    assert col.info()["index"]["buffered"] == 0 and _recall(col, queries, stored) >= 0.9


def test_rescoring_from_disk_on_a_spann_collection(tmp_path: Path, wiki: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = wiki
    client = nestvec.connect(tmp_path)
    plain = client.create_collection("plain", encoder=None, dim=384, codec="binary", index="spann")
    rescored = client.create_collection("rescored", encoder=None, dim=384, codec="binary+rescore:fp16", index="spann")
    stored = _fill(plain, base, 0, 3000)
    _fill(rescored, base, 0, 3000)
    assert rescored.info()["index"]["kind"] == "spann"
    assert _recall(rescored, queries, stored) >= _recall(plain, queries, stored) + 0.1  # binary alone ranks poorly
    assert _recall(rescored, queries, stored) >= 0.85
