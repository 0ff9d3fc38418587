"""LMDB storage: a failing batch commits nothing, and the map grows when full."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import nestvec
import nestvec.collection
import nestvec.index.store
from nestvec.index.store import Put


def test_failure_inside_the_write_transaction_commits_nothing(
        tmp_path: Path, scifact_vectors: tuple[list[str], np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    ids, vecs = scifact_vectors
    client = nestvec.connect(tmp_path)
    col = client.create_collection("t", encoder=None, dim=384, codec="fp8")
    col.upsert(ids[:20], vectors=vecs[:20], texts=["v1"] * 20)
    made = []

    def failing_put(key: bytes, document: bytes, code: bytes, rescore: bytes | None = None,
                    vid: int | None = None) -> Put:
        made.append(key)
        return Put(b"" if len(made) == 5 else key, document, code, rescore, vid)  # LMDB rejects empty keys

    monkeypatch.setattr(nestvec.collection, "Put", failing_put)
    with pytest.raises(Exception, match=r"(?i)val|size|key"):
        col.upsert(ids[10:30], vectors=vecs[30:50], texts=["v2"] * 20)
    assert len(made) == 20  # the failure happened inside the batch, after some puts
    monkeypatch.undo()
    assert col.count() == 20 and col.get([ids[25]]) == [None]
    assert all(r is not None and r.text == "v1" for r in col.get(ids[:20]))
    client.close()
    reopened = nestvec.connect(tmp_path).get_collection("t")
    assert reopened.count() == 20 and all(r is not None and r.text == "v1" for r in reopened.get(ids[:20]))


def test_map_size_grows_as_needed(tmp_path: Path, scifact_vectors: tuple[list[str], np.ndarray],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nestvec.index.store, "INITIAL_MAP_SIZE", 1 << 20)
    ids, vecs = scifact_vectors
    with nestvec.connect(tmp_path) as client:
        col = client.create_collection("g", encoder=None, dim=384, codec="fp32")
        col.upsert(ids[:3000], vectors=vecs[:3000])  # ~4.6 MB of codes in one transaction
        assert col.store.env.info()["map_size"] > 4 << 20
        assert col.count() == 3000
    with nestvec.connect(tmp_path) as client:
        col = client.get_collection("g")
        assert col.count() == 3000 and col.search(vecs[42], k=1)[0].id == ids[42]


def test_crash_between_codec_save_and_reencode_is_finished_on_open(
        tmp_path: Path, scifact_vectors: tuple[list[str], np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    ids, vecs = scifact_vectors
    client = nestvec.connect(tmp_path)
    col = client.create_collection("c", encoder=None, dim=384, codec="int8")
    col.upsert(ids[:500], vectors=vecs[:500], texts=[f"t{i}" for i in range(500)])

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("simulated crash after the fitted codec was saved")

    monkeypatch.setattr(nestvec.index.store.LmdbStore, "rewrite_codes", crash)
    with pytest.raises(KeyboardInterrupt):
        col.fit_codec(vecs[:2000])
    monkeypatch.undo()
    col.store.close()
    client._open.clear()
    reopened = nestvec.connect(tmp_path).get_collection("c")  # sees a fitted codec and staged codes
    assert reopened.codec.fitted and reopened.info()["staged_vectors"] == 0 and reopened.count() == 500
    assert reopened.index.codes().shape == (500, 384)
    assert reopened.search(vecs[42], k=1)[0].id == ids[42]
    assert reopened.get([ids[7]])[0].text == "t7"  # type: ignore[union-attr]


def _rss_file_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="mapped pages are found in /proc (Linux)")
def test_bulk_writes_release_the_pages_they_mapped_and_keep_the_data(
        tmp_path: Path, scifact_vectors: tuple[list[str], np.ndarray]) -> None:
    """LMDB writes through its map: what a bulk load wrote would stay resident. Past RELEASE_STEP
    bytes the store unmaps the file's pages; the data is still all there, read back from the file."""
    from nestvec.memory import RELEASE_STEP, mapped_file

    _, vecs = scifact_vectors
    col = nestvec.connect(tmp_path).create_collection("t", encoder=None, dim=384, codec="int8")
    pages = mapped_file(tmp_path / "t" / "data.lmdb" / "data.mdb")
    pages.step = 1 << 62  # nothing released while the data goes in
    text = "x" * 20_000   # 40 MB of documents: well over the release step
    col.upsert([f"d{i}" for i in range(2000)], vectors=np.resize(vecs, (2000, 384)), texts=[text] * 2000)
    before = _rss_file_mb()
    assert before > 30
    pages.step = RELEASE_STEP
    pages.charge(RELEASE_STEP)
    assert pages.releases >= 1 and _rss_file_mb() < before - 30
    got = col.get([f"d{i}" for i in range(0, 2000, 97)])
    assert all(r is not None and r.text == text for r in got)


def test_page_hints_are_sent_only_while_storage_is_being_read(tmp_path: Path) -> None:
    """StorageReads turns hinting off after a window without storage reads and back on when
    read_bytes rises again by more than its bar (a stray page or two does not count); where the
    counter cannot be read, it always hints."""
    from nestvec.memory import StorageReads

    io = tmp_path / "io"
    io.write_text("rchar: 10\nread_bytes: 4096\nwrite_bytes: 0\n")
    assert StorageReads(window_s=60.0, source=str(io)).lately()  # within its first window, a process hints
    reads = StorageReads(window_s=0.0, source=str(io), min_bytes=64 << 10)
    assert not reads.lately()                   # no storage reads since the last look
    io.write_text("rchar: 10\nread_bytes: 8192\nwrite_bytes: 0\n")
    assert not reads.lately()                   # one stray page: still cached
    io.write_text(f"rchar: 10\nread_bytes: {8192 + (64 << 10) + 1}\nwrite_bytes: 0\n")
    assert reads.lately() and not reads.lately()
    assert StorageReads(window_s=0.0, source=str(tmp_path / "missing")).lately()
    blind = StorageReads(window_s=0.0, source=str(tmp_path / "missing"))
    blind.lately()
    assert blind.lately()


def test_posting_reads_are_the_same_with_and_without_page_hints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmdb

    import nestvec.index.postings as postings

    env = lmdb.open(str(tmp_path / "p.lmdb"), map_size=1 << 26, max_dbs=8)
    store = postings.PostingStore(env)
    rng = np.random.default_rng(0)
    lists = {lid: (np.arange(lid * 100, lid * 100 + 30 + lid), rng.integers(0, 256, (30 + lid, 16), dtype=np.uint8))
             for lid in range(6)}
    store.write(lists)
    for hint in (True, False, True):
        monkeypatch.setattr(postings.storage_reads, "lately", lambda hint=hint: hint)
        with env.begin(buffers=True) as txn:
            got = store.read(txn, [4, 9, 0, 2], 16)  # 9 does not exist
            assert [g[0] for g in got] == [4, 0, 2]
            for lid, ids, codes in got:
                assert np.array_equal(ids, lists[lid][0]) and np.array_equal(codes, lists[lid][1])
    assert store._where  # the hinted reads remembered where the lists sat
