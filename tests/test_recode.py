"""Switching a collection's codec (`recode`, `nestvec plan --apply`): every code re-encoded, flat
and SPANN, searches served during the switch, and a crash (a real subprocess killed mid-way)
leaves the old codec or the new one, never a mix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nestvec
from nestvec.errors import FailedPreconditionError, InvalidArgumentError
from realdata import DATA, REPO, shipped_embeddings


def _exact_top10(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :10]


def _recall(found: list[list[str]], truth: np.ndarray) -> float:
    return float(np.mean([len({int(i[1:]) for i in hits} & set(row.tolist())) / 10
                          for hits, row in zip(found, truth, strict=True)]))


def _search_ids(col: Any, queries: np.ndarray) -> list[list[str]]:
    return [[h.id for h in hits] for hits in col.search_batch(queries, k=10)]


@pytest.fixture(scope="module")
def cranfield() -> np.ndarray:
    return np.ascontiguousarray(shipped_embeddings("cranfield")[1], dtype=np.float32)


def test_a_flat_collection_switches_codec_and_keeps_its_documents(cranfield: np.ndarray, tmp_path: Path) -> None:
    base, queries = cranfield[:1300], cranfield[1300:1400]
    client = nestvec.connect(tmp_path)
    col = client.create_collection("c", encoder=None, dim=384, codec="fp32")
    ids = [f"d{i}" for i in range(len(base))]
    col.upsert(ids, vectors=base, texts=[f"text {i}" for i in range(len(base))],
               metadata=[{"n": i} for i in range(len(base))])
    col.delete(ids[:5])
    truth = _exact_top10(base[5:], queries) + 5
    summary = col.recode("pca96+int8", progress=False)
    assert summary["from"] == "stored fp32 vectors" and summary["vectors"] == len(base) - 5
    assert col.info()["codec"] == "pca96+int8" and col.info()["bytes_per_vector"] == 96
    found = _search_ids(col, queries)
    assert 0.75 <= _recall(found, truth) < 1.0  # 16x smaller codes: close to exact, not equal
    assert col.get(["d7"])[0].text == "text 7" and col.get(["d7"])[0].metadata == {"n": 7}
    assert col.get(["d1"]) == [None] and col.count() == len(base) - 5
    assert col.search(queries[0], k=3, filter={"n": {"$lt": 100}})  # metadata filters still line up
    client.close()
    reopened = nestvec.connect(tmp_path).get_collection("c")
    assert reopened.info()["codec"] == "pca96+int8" and _search_ids(reopened, queries) == found
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.startswith("codec")) == \
        [f"codec.{reopened._generation}"]
    with pytest.raises(InvalidArgumentError, match="codec"):
        reopened.recode("pca96+int4")
    small = nestvec.connect(tmp_path).create_collection("s", encoder=None, dim=384, codec="fp32")
    small.upsert(["a", "b", "c"], vectors=base[:3])
    with pytest.raises(FailedPreconditionError, match="needs at least"):
        small.recode("int8")
    assert small.info()["codec"] == "fp32" and small.count() == 3  # refused: nothing changed


def test_a_spann_collection_switches_while_it_is_searched(tmp_path: Path) -> None:
    vectors = np.load(DATA / "wiki250k" / "minilm_base150k_fp16.npy",
                      mmap_mode="r")[:6000].astype(np.float32)
    base, queries = vectors[:5800], vectors[5800:]
    col = nestvec.connect(tmp_path).create_collection("w", encoder=None, dim=384, codec="int8", index="spann")
    col.upsert([f"d{i}" for i in range(len(base))], vectors=base)
    col.flush_index()
    assert col.info()["index"]["kind"] == "spann"
    truth = _exact_top10(base, queries)
    errors: list[BaseException] = []
    served = [0]
    stop = threading.Event()

    def search_all_the_time() -> None:
        while not stop.is_set():
            try:
                assert all(len(hits) == 10 for hits in col.search_batch(queries[:20], k=10))
                served[0] += 1
            except BaseException as err:  # reported below
                errors.append(err)
                return

    reader = threading.Thread(target=search_all_the_time)
    reader.start()
    try:
        summary = col.recode("fp8", progress=False)
    finally:
        stop.set()
        reader.join()
    assert not errors and served[0] >= 2, (errors, served)
    assert summary["codec"] == "fp8" and col.info()["index"]["kind"] == "spann"
    assert _recall(_search_ids(col, queries), truth) >= 0.85
    col.upsert(["new"], vectors=base[:1] * 0.5 + base[1:2] * 0.5)  # writes go on after the switch
    assert col.search(base[0] * 0.5 + base[1] * 0.5, k=1)[0].id == "new"


def test_a_recode_killed_mid_way_leaves_the_old_codec_whole(cranfield: np.ndarray, tmp_path: Path) -> None:
    vectors = np.load(DATA / "wiki250k" / "minilm_base150k_fp16.npy",
                      mmap_mode="r")[:20000].astype(np.float32)
    client = nestvec.connect(tmp_path)
    col = client.create_collection("w", encoder=None, dim=384, codec="int8", index="spann")
    col.upsert([f"d{i}" for i in range(len(vectors))], vectors=vectors)
    col.flush_index()
    queries = vectors[:50] * 0.9 + vectors[50:100] * 0.1
    before = _search_ids(col, queries)
    client.close()  # the subprocess writes: this process must not hold the collection's writer locks
    script = "import sys, nestvec; nestvec.connect(sys.argv[1]).get_collection('w').recode('pca96+int8', progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    # the new codec's folder appears after the switch is under way and long before it commits
    while not any(p.name.startswith("codec.g") for p in (tmp_path / "w").iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the recode ended before it could be killed"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reopened = nestvec.connect(tmp_path).get_collection("w")
    assert reopened.info()["codec"] == "int8" and reopened.count() == len(vectors)
    assert _search_ids(reopened, queries) == before
    assert [p.name for p in (tmp_path / "w").iterdir() if p.name.startswith("codec")] == ["codec"]


def test_a_crash_after_the_switch_committed_finishes_on_open(cranfield: np.ndarray, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    col = nestvec.connect(tmp_path).create_collection("c", encoder=None, dim=384, codec="int8")
    col.upsert([f"d{i}" for i in range(1400)], vectors=cranfield)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("the process died right after the commit")

    monkeypatch.setattr(type(col), "_save_config", crash)
    with pytest.raises(KeyboardInterrupt):
        col.recode("fp8", progress=False)
    monkeypatch.undo()
    reopened = nestvec.connect(tmp_path).get_collection("c")
    assert reopened.info()["codec"] == "fp8" and reopened.config.codec == "fp8"
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith("codec")] == \
        [f"codec.{reopened._generation}"]
    assert _recall(_search_ids(reopened, cranfield[:30]), _exact_top10(cranfield, cranfield[:30])) >= 0.9
