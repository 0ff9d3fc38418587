"""Regression tests for bugs the torture harness found (bench/torture.py), one per bug."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import nestvec
from realdata import shipped_embeddings


@pytest.mark.parametrize("codec", ["fp8", "fp8e5m2", "binary"])
@pytest.mark.parametrize("index", ["flat", "spann"])
def test_codecs_faiss_cannot_read_accept_writes_after_a_search(tmp_path: Path, codec: str, index: str) -> None:
    """Found by the crash workload after a codec switch to fp8: the flat scan marks a codec faiss
    cannot read with False, and the next append called False.add_sa_codes (AttributeError), so
    every upsert after the first search failed on fp8 and binary collections."""
    ids, vectors = shipped_embeddings("scifact")
    collection = nestvec.connect(tmp_path).create_collection("c", encoder=None, dim=384, codec=codec, index=index)
    collection.upsert(ids[:1500], vectors=vectors[:1500])
    assert collection.search(vectors[0], k=1)[0].id == ids[0]
    collection.upsert(ids[1500:1600], vectors=vectors[1500:1600])  # raised before the fix
    assert collection.count() == 1600
    assert collection.search(vectors[1550], k=1)[0].id == ids[1550]
    assert np.isfinite(collection.search(vectors[1599], k=3)[0].score)


def test_counting_the_lexical_folder_survives_files_removed_meanwhile(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the API fuzzer (seed 2026, case ~2700 of 5,000): Describe sums the lexical folder's
    file sizes while tantivy's merge threads delete old segment files; a file listed and then
    removed before its stat raised FileNotFoundError, and Describe answered INTERNAL. Here the
    removal lands exactly between the listing and the stat."""
    from nestvec import fsutil

    (tmp_path / "kept.idx").write_bytes(b"x" * 100)
    (tmp_path / "merged-away.fieldnorm").write_bytes(b"y" * 50)
    real_scandir = os.scandir

    class ListedThenRemoved:
        def __init__(self, path: Path) -> None:
            with real_scandir(path) as entries:
                self.entries = list(entries)
            (tmp_path / "merged-away.fieldnorm").unlink()  # a merge finishing between list and stat

        def __enter__(self) -> list[os.DirEntry[str]]:
            return self.entries

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(fsutil.os, "scandir", ListedThenRemoved)
    assert fsutil.folder_bytes(tmp_path) == 100


def test_describe_answers_while_lexical_merges_delete_segments(tmp_path: Path) -> None:
    """The same race end to end: info() (Describe) called in a loop while another thread writes
    small batches, each a tantivy commit whose merges remove segment files."""
    ids, vectors = shipped_embeddings("scifact")
    collection = nestvec.connect(tmp_path).create_collection("c", encoder=None, dim=384)
    errors: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        try:
            for start in range(0, 600, 4):
                collection.upsert(ids[start:start + 4], vectors=vectors[start:start + 4],
                                  texts=[f"passage {i} about bone density" for i in range(start, start + 4)])
                collection.search("bone density", k=1, mode="lexical")  # publishes: one commit per batch
        except BaseException as error:  # reported by the assertion below
            errors.append(error)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    calls = 0
    while not done.is_set():
        assert collection.info()["disk_bytes"] > 0
        calls += 1
    writer.join()
    assert not errors and calls > 0 and collection.count() == 600
