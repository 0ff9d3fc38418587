"""Disk full, short version of `python bench/torture.py disk`, and one regression test per bug it found.

The part itself runs on a tmpfs where this machine lets the test mount one, else under the storage
limit; the storage limit (max_disk_bytes / serve --max-disk-mb) is a product feature and is run
on its own as well, wherever the tests run."""

from __future__ import annotations

import argparse
import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import nestvec
import nestvec.fsutil
import nestvec.index.lexical
import nestvec.index.store
from bench.tortures import disk, part_args
from nestvec.errors import ResourceExhaustedError
from realdata import shipped_embeddings


def _args(**overrides: object) -> argparse.Namespace:
    return part_args(disk, **overrides)


def _check(result: dict[str, object], transports: int) -> list[dict[str, object]]:
    runs = result["runs"]
    assert isinstance(runs, list) and len(runs) == transports
    assert result["passed"], result["failures"]
    for run in runs:
        assert run["failures"] == [], run
        assert run["acked_before_full"] > 0 and run["acked_total"] > run["acked_before_full"]
        assert "full" in run["error"]  # the message says what is full
        assert run["overwrite_while_full"] == "failed"  # the unchanged-after-failure check really ran
        assert run["verify"]["count"] == run["acked_total"] == run["final"]["count"]
        assert run["verify"]["content"] == run["final"]["content"]  # a fresh process reads the same documents
        if run["transport"] == "grpc":
            assert run["grpc_status"] == "RESOURCE_EXHAUSTED" and run["server_alive"] and run["server_exit"] == 0
        else:
            assert run["exit_code"] == 0  # SIGBUS (-7) before the fix
    return runs


def test_a_full_disk_fails_writes_cleanly_and_they_resume_when_space_is_freed() -> None:
    """On a tmpfs (when mounting is allowed here), else under the storage limit: the result says which."""
    result = disk.run(_args())
    runs = _check(result, 2)
    assert result["mode"] in ("tmpfs", "cap") and all(r["mode"] == result["mode"] for r in runs)
    if result["mode"] == "tmpfs":
        assert all(r["create_while_full"] == "ResourceExhaustedError" for r in runs)
        # Whether a small write squeezes into the last blocks, and whether the lexical index then
        # falls behind, depends on where the disk fills (not asserted: it varies run to run); either
        # way the index must have caught up once space is freed.
        assert all(r["small_write_squeezed"] in ("written", "failed") for r in runs)
        assert all(not r["lexical_behind"] and r["final"]["own_lexical"] == 1.0 for r in runs)  # caught up
    else:
        assert result["mount_error"]


def test_the_storage_limit_embedded_and_over_grpc() -> None:
    result = disk.run(_args(mode="cap"))
    runs = _check(result, 2)
    assert result["mode"] == "cap" and all("max_disk_bytes" in r["error"] for r in runs)


# -- regression tests, one per bug found --------------------------------------------------------------
def test_a_map_that_cannot_grow_is_an_error_not_a_sigbus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found on an 8 MB tmpfs: LMDB wrote through a sparse map and the process died of SIGBUS.
    Now the file is allocated before the map grows; no space is a ResourceExhaustedError, the
    collection is unchanged, and the same write succeeds once there is space."""
    ids, vectors = shipped_embeddings("scifact")
    col = nestvec.connect(tmp_path).create_collection("c", encoder=None, dim=384)
    col.upsert(ids[:100], vectors=vectors[:100], texts=[f"doc {i}" for i in range(100)])
    data = Path(col.store.path) / "data.mdb"
    real = os.posix_fallocate

    def no_space(fd: int, offset: int, length: int) -> None:
        if length > data.stat().st_size:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(ResourceExhaustedError, match="disk full"):
        col.upsert(ids[100:3000], vectors=vectors[100:3000], texts=["x" * 2000] * 2900)
    assert col.count() == 100 and col.get([ids[100]]) == [None] and col.get([ids[5]])[0].text == "doc 5"
    assert col.search(vectors[5], k=1)[0].id == ids[5]
    monkeypatch.undo()
    assert col.upsert(ids[100:3000], vectors=vectors[100:3000], texts=["x" * 2000] * 2900) == 2900
    assert col.count() == 3000 and col.search(vectors[2500], k=1)[0].id == ids[2500]


def test_a_store_at_its_limit_refuses_and_a_larger_limit_takes_more(tmp_path: Path) -> None:
    """The storage limit is enforced exactly and survives reopening with another limit."""
    ids, vectors = shipped_embeddings("scifact")
    with pytest.raises(ValueError, match="max_disk_bytes"):
        nestvec.connect(tmp_path, max_disk_bytes=1000)
    with nestvec.connect(tmp_path, max_disk_bytes=3 << 20) as client:
        col = client.create_collection("c", encoder=None, dim=384, codec="fp32")
        written = 0
        with pytest.raises(ResourceExhaustedError, match="max_disk_bytes"):
            for lo in range(0, len(ids), 200):
                col.upsert(ids[lo:lo + 200], vectors=vectors[lo:lo + 200])
                written = lo + 200
        assert col.count() == written and col.store.env.map_size <= 3 << 20
    with nestvec.connect(tmp_path, max_disk_bytes=64 << 20) as client:
        col = client.get_collection("c")
        assert col.count() == written
        col.upsert(ids[written:written + 200], vectors=vectors[written:written + 200])
        assert col.count() == written + 200


def test_a_map_resize_does_not_break_concurrent_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found reading py-lmdb under the soak's mix: resizing the map invalidates every open
    transaction of the process, so a get() or a search's document read beside an upsert that grew
    the map failed ("Attempt to operate on closed/deleted/dropped object"). Resizes now wait for
    open transactions."""
    monkeypatch.setattr(nestvec.index.store, "INITIAL_MAP_SIZE", 1 << 20)
    monkeypatch.setattr(nestvec.index.store, "MAX_GROWTH", 1 << 20)  # many resizes: one per MB written
    ids, vectors = shipped_embeddings("scifact")
    col = nestvec.connect(tmp_path).create_collection("c", encoder=None, dim=384, codec="fp32")
    col.upsert(ids[:200], vectors=vectors[:200], texts=[f"text {i}" for i in range(200)])
    errors: list[str] = []
    stop = threading.Event()

    def read() -> None:
        rng = np.random.default_rng(threading.get_ident() % 1000)
        while not stop.is_set():
            try:
                i = int(rng.integers(200))
                assert col.get([ids[i]])[0].text == f"text {i}"
                assert col.search(vectors[i], k=3)[0].id == ids[i]
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
                return

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    sizes = set()
    try:
        for lo in range(200, 3200, 100):
            col.upsert(ids[lo:lo + 100], vectors=vectors[lo:lo + 100], texts=["y" * 1500] * 100)
            sizes.add(col.store.env.map_size)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert len(sizes) > 5  # the map grew many times while the readers read
    assert errors == []


def test_a_lexical_write_that_fails_after_the_commit_keeps_the_write(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Found on the full tmpfs: tantivy's writer dies (ValueError) after LMDB has committed; the
    upsert raised and the in-RAM state skipped the committed batch (count, dense search). Now the
    write stands, the lexical index is marked behind and replays the batch from the log."""
    ids, vectors = shipped_embeddings("scifact")
    col = nestvec.connect(tmp_path).create_collection("c", encoder=None, dim=384)
    col.upsert(ids[:100], vectors=vectors[:100], texts=[f"alpha{i} common" for i in range(100)])
    real = nestvec.index.lexical.LexicalIndex.commit

    def dead_writer(self: object, sequence: int) -> None:
        raise ValueError("An index writer was killed.. (io::Error most likely)")

    monkeypatch.setattr(nestvec.index.lexical.LexicalIndex, "commit", dead_writer)
    assert col.upsert(ids[100:120], vectors=vectors[100:120], texts=[f"beta{i} common" for i in range(20)]) == 20
    col.search("beta3", k=1, mode="lexical")  # the commit it forces fails too
    assert col.info()["lexical_behind"]
    assert col.count() == 120 and col.get([ids[110]])[0].text == "beta10 common"
    assert col.search(vectors[110], k=1)[0].id == ids[110]
    monkeypatch.setattr(nestvec.index.lexical.LexicalIndex, "commit", real)
    col.upsert(ids[120:121], vectors=vectors[120:121], texts=["gamma common"])  # the next write catches up
    assert not col.info()["lexical_behind"]
    assert [h.id for h in col.search("beta10", k=1, mode="lexical")] == [ids[110]]
    assert [h.id for h in col.search("gamma", k=1, mode="lexical")] == [ids[120]]


def test_maintenance_that_finds_the_disk_full_does_not_fail_the_committed_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found on the full tmpfs: the upsert that brought a flat collection to its codec-fit size
    committed, then the fit's re-encoding found no space and the upsert raised anyway."""
    ids, vectors = shipped_embeddings("scifact")
    col = nestvec.connect(tmp_path).create_collection("c", encoder=None, dim=384, codec="int8")
    col.upsert(ids[:1000], vectors=vectors[:1000])

    def full(*args: object, **kwargs: object) -> None:
        raise ResourceExhaustedError("disk full: no space (test)")

    monkeypatch.setattr(nestvec.index.store.LmdbStore, "rewrite_codes", full)
    assert col.upsert(ids[1000:1100], vectors=vectors[1000:1100]) == 100  # raised before the fix
    assert col.count() == 1100 and col.staged
    monkeypatch.undo()
    col.upsert(ids[1100:1110], vectors=vectors[1100:1110])
    assert not col.staged and col.count() == 1110 and col.search(vectors[1105], k=1)[0].id == ids[1105]


def test_a_full_disk_under_a_new_collection_is_resource_exhausted(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Found on the full tmpfs: creating a collection raised lmdb.MapFullError (its databases
    could not be created in an unallocated map), and a config write a bare OSError."""
    client = nestvec.connect(tmp_path)

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(ResourceExhaustedError, match="disk full"):
        client.create_collection("c", encoder=None, dim=384)
    assert client.list_collections() == [] and not any(p.name.startswith(".creating") for p in tmp_path.iterdir())
    monkeypatch.undo()

    def replace(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nestvec.fsutil.os, "replace", replace)
    with pytest.raises(ResourceExhaustedError, match="disk full"):
        nestvec.fsutil.write_json(tmp_path / "x.json", {"a": 1})
    assert list(tmp_path.glob(".x.json.*")) == []  # the temp file went too
