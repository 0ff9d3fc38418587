"""Bulk ingest jobs on real wiki250k passages: streamed sources, checkpoints, resume after SIGKILL,
and the same job into a server."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nestvec.catalog import Catalog
from nestvec.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from nestvec.jobs.ingest import ingest
from nestvec.jobs.sources import Source
from realdata import REPO, wiki_slice

N = 3000


@pytest.fixture(scope="module")
def wiki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return wiki_slice(tmp_path_factory.mktemp("wiki"), N)


def _rows(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_sources_read_jsonl_parquet_and_text_from_any_position(wiki: tuple[Path, Path], tmp_path: Path) -> None:
    text, vectors = wiki
    rows = _rows(text)
    parquet = tmp_path / "passages.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=700)  # the start falls inside a group
    plain = tmp_path / "passages.txt"
    plain.write_text("".join(f"{r['text']}\n\n" for r in rows[:50]), encoding="utf-8")  # blank lines are skipped

    jsonl = Source(text, vectors=vectors)
    assert jsonl.format == "jsonl" and jsonl.count() == N and jsonl.dim == 384
    batches = list(jsonl.batches(1234, 500, first=100))
    assert [b.start for b in batches] == [1234, 1334, 1834, 2334, 2834] and batches[-1].end == N
    assert batches[0].documents[0].id == rows[1234]["_id"]
    assert batches[0].documents[0].text == f"{rows[1234]['title']}. {rows[1234]['text']}"
    np.testing.assert_array_equal(batches[1].vectors, np.load(vectors)[1334:1834])

    from_parquet = Source(parquet)
    assert from_parquet.format == "parquet" and from_parquet.count() == N
    got = [d for b in from_parquet.batches(1234, 300) for d in b.documents]
    assert [d.id for d in got] == [r["_id"] for r in rows[1234:]]
    assert [d.text for d in got] == [d.text for b in batches for d in b.documents]

    lines = Source(plain, limit=20)
    assert lines.format == "text" and lines.count() == 20
    assert [d.id for b in lines.batches(0, 8) for d in b.documents][:2] == ["1", "3"]  # ids are line numbers


def test_bad_sources_fail_before_anything_is_written(wiki: tuple[Path, Path], tmp_path: Path) -> None:
    text, vectors = wiki
    with pytest.raises(NotFoundError):
        Source(tmp_path / "missing.jsonl")
    with pytest.raises(InvalidArgumentError, match="format"):
        Source(text, fmt="csv")
    short = tmp_path / "short.npy"
    np.save(short, np.load(vectors)[:100])
    with pytest.raises(InvalidArgumentError, match="--limit 100"):
        Source(text, vectors=short).count()
    broken = tmp_path / "broken.jsonl"
    with gzip.open(text, "rt", encoding="utf-8") as fh:
        good = [next(fh) for _ in range(5)]
    broken.write_text("".join(good[:3]) + "{not json\n" + good[3], encoding="utf-8")
    with Catalog(tmp_path / "data") as catalog:
        col = catalog.create_collection("w", encoder=None, dim=384)
        with pytest.raises(InvalidArgumentError, match=r"broken.jsonl:4"):
            ingest(col, Source(broken, vectors=vectors), progress=False)
        assert col.count() == 0 and col.jobs() == {}
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"_id": ["a"], "body": ["x"]}), no_text)
    with pytest.raises(InvalidArgumentError, match="'text' column"):
        Source(no_text).count()


def test_a_job_checkpoints_each_batch_and_resumes_where_it_stopped(wiki: tuple[Path, Path], tmp_path: Path) -> None:
    text, vectors = wiki
    source = Source(text, vectors=vectors)
    with Catalog(tmp_path / "data") as catalog:
        col = catalog.create_collection("w", encoder=None, dim=384)
        # An interrupted run: its first 1,000 documents committed with their checkpoint.
        first = next(source.batches(0, 1000))
        state = {"fingerprint": source.fingerprint(), "position": 1000, "total": N, "done": False}
        col.upsert([d.id for d in first.documents], texts=[d.text for d in first.documents], vectors=first.vectors,
                   checkpoint=(source.job_name(), state))
        summary = ingest(col, source, batch_size=400, resume=True, progress=False)
        assert summary.resumed_from == 1000 and summary.documents == N - 1000 and col.count() == N
        job = col.jobs()[source.job_name()]
        assert job["position"] == N and job["done"] is True and job["fingerprint"] == source.fingerprint()
        # Resuming a finished job writes nothing; a changed input is refused.
        assert ingest(col, source, resume=True, progress=False).documents == 0
        other = tmp_path / "other.npy"
        np.save(other, np.load(vectors)[::-1].copy())
        moved = Source(text, vectors=other)
        col.upsert(["x"], vectors=np.load(vectors)[:1], checkpoint=(moved.job_name(), {**job, "done": False}))
        with pytest.raises(FailedPreconditionError, match="changed since the checkpoint"):
            ingest(col, moved, resume=True, progress=False)


def test_checkpoints_are_validated_and_written_with_their_batch(tmp_path: Path, wiki: tuple[Path, Path]) -> None:
    vectors = np.load(wiki[1])[:3]
    with Catalog(tmp_path / "data") as catalog:
        col = catalog.create_collection("w", encoder=None, dim=384)
        for bad in [("", {}), ("job", [1]), ("job", {"x": float("nan")}), ("x" * 300, {}), "job"]:
            with pytest.raises(InvalidArgumentError, match="checkpoint"):
                col.upsert(["a", "b", "c"], vectors=vectors, checkpoint=bad)  # type: ignore[arg-type]
        assert col.count() == 0 and col.jobs() == {}  # a refused checkpoint writes nothing
        with pytest.raises(InvalidArgumentError):
            col.upsert(["a", "b"], vectors=vectors, checkpoint=("job", {"position": 2}))  # bad batch: no checkpoint
        assert col.jobs() == {}
        col.upsert(["a", "b", "c"], vectors=vectors, checkpoint=("job", {"position": 3}))
        assert col.jobs() == {"job": {"position": 3}} and col.info()["jobs"] == col.jobs()


def _cli(data: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "nestvec.cli", "--data", str(data), "ingest", *args]


def test_sigkill_mid_ingest_then_resume_equals_an_uninterrupted_run(wiki: tuple[Path, Path], tmp_path: Path) -> None:
    """A real `nestvec ingest` process, encoding with the bundled model, killed with SIGKILL
    part-way, then run again with --resume: it encodes only what was not committed, and the
    collection holds the same ids, texts and codes as a run that was never interrupted."""
    text, _ = wiki
    n = 600
    job = ["--collection", "w", "--limit", str(n), "--batch-size", "50", "--fit-size", "300"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cli(tmp_path / "whole", str(text), *job, "--no-progress"), check=True, env=env,
                   capture_output=True)

    proc = subprocess.Popen(_cli(tmp_path / "killed", str(text), *job), stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    seen, buffer = 0, b""
    deadline = time.time() + 120
    while seen < 350 and time.time() < deadline:  # tqdm's bar on stderr: "... 350/600 ..."
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        buffer = (buffer + chunk)[-4096:]
        counts = re.findall(rb"(\d+)/600", buffer)
        seen = int(counts[-1]) if counts else 0
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert 300 <= seen < n, f"the job was not caught mid-way ({seen} documents)"

    resumed = subprocess.run(_cli(tmp_path / "killed", str(text), *job, "--no-progress", "--resume"), check=True,
                             env=env, capture_output=True, text=True)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] >= seen and summary["documents"] == n - summary["resumed_from"]
    assert summary["count"] == n

    with Catalog(tmp_path / "whole") as whole, Catalog(tmp_path / "killed") as killed:
        a, b = whole.get_collection("w"), killed.get_collection("w")
        ids = [r["_id"] for r in _rows(text)[:n]]
        assert a.count() == b.count() == n
        assert [r.text if r else None for r in a.get(ids)] == [r.text if r else None for r in b.get(ids)]
        keys = [i.encode() for i in ids]
        np.testing.assert_array_equal(a.store.get_codes(keys, a.codec.bytes_per_vector),
                                      b.store.get_codes(keys, b.codec.bytes_per_vector))
        job_state = b.jobs()
        assert len(job_state) == 1 and next(iter(job_state.values()))["done"] is True


def test_the_same_job_into_a_server_through_upsert_stream(wiki: tuple[Path, Path], tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "tests" / "service"))
    from servers import ADMIN_KEY, RunningServer

    text, vectors = wiki
    server = RunningServer(tmp_path / "served", api_keys=[ADMIN_KEY])
    try:
        client = server.client()
        col = client.create_collection("w", encoder=None, dim=384)
        source = Source(text, vectors=vectors, limit=2000)
        summary = ingest(col, source, batch_size=300, progress=False)
        assert summary.documents == 2000 and col.count() == 2000
        assert col.jobs()[source.job_name()]["done"] is True
        hits = col.search(np.load(vectors)[42], k=1)
        assert hits[0].id == _rows(text)[42]["_id"] and hits[0].text
        col.upsert(["p0"], vectors=np.load(vectors)[:1], checkpoint=(source.job_name(), {
            "fingerprint": source.fingerprint(), "position": 1500, "done": False}))
        again = ingest(col, source, batch_size=300, resume=True, progress=False)
        assert again.resumed_from == 1500 and again.documents == 500 and col.count() == 2001
        with pytest.raises(InvalidArgumentError, match="checkpoint"):
            col.upsert(["q"], vectors=np.load(vectors)[:1], checkpoint=("", {}))
        client.close()
    finally:
        server.stop()


def _start_local_ray(ray: Any) -> None:
    """ray.init() on this 2-core machine; once in a few fresh-clone runs the raylet missed Ray's
    fixed 30 s registration window ("The current node timed out during startup"): start again."""
    for attempt in range(2):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            return
        except Exception as err:
            ray.shutdown()
            if attempt or "timed out during startup" not in str(err):
                raise


def test_the_ray_path_writes_what_the_single_process_path_writes(wiki: tuple[Path, Path], tmp_path: Path) -> None:
    """A local Ray (ray.init() in this process): Ray Data reads the JSONL, an actor pool encodes,
    this process writes; the same ids and texts as the plain job, the same codes but for float
    rounding (the actor's torch runs with other threads: a few int8 codes differ by one), the same
    search results; and it resumes."""
    import ray

    from nestvec.encoders import BUNDLED_MODEL, load_encoder
    from nestvec.jobs.ray_encode import RayOptions

    text, _ = wiki
    source = Source(text, limit=600)
    ids = [r["_id"] for r in _rows(text)[:600]]
    _start_local_ray(ray)
    try:
        with Catalog(tmp_path / "plain") as plain, Catalog(tmp_path / "ray") as on_ray:
            encoder = load_encoder()
            a = plain.create_collection("w", encoder=encoder)
            ingest(a, source, encoder=encoder, batch_size=300, fit_size=300, progress=False)
            b = on_ray.create_collection("w", encoder=encoder)
            summary = ingest(b, source, batch_size=300, fit_size=300, progress=False,
                             ray=RayOptions(BUNDLED_MODEL))
            assert summary.documents == 600 and b.count() == 600
            assert [r.text if r else None for r in a.get(ids)] == [r.text if r else None for r in b.get(ids)]
            keys = [i.encode() for i in ids]

            def same_codes() -> None:
                gap = np.abs(a.store.get_codes(keys, 384).astype(int) - b.store.get_codes(keys, 384).astype(int))
                assert gap.max() <= 1 and (gap > 0).mean() < 1e-3

            same_codes()
            queries = encoder.encode([f"{t.split('.')[0]}" for t in (r.text or "" for r in a.get(ids[:20]) if r)],
                                     kind="query")
            assert [[h.id for h in hits] for hits in a.search_batch(queries, 10)] == \
                [[h.id for h in hits] for hits in b.search_batch(queries, 10)]
            assert b.jobs()[source.job_name()]["done"] is True
            first = b.get([ids[0]])[0]
            assert first is not None
            state = {**b.jobs()[source.job_name()], "position": 300, "done": False}
            b.upsert([ids[0]], texts=[first.text], checkpoint=(source.job_name(), state))
            again = ingest(b, source, batch_size=300, resume=True, progress=False, ray=RayOptions(BUNDLED_MODEL))
            assert again.resumed_from == 300 and again.documents == 300 and b.count() == 600
            same_codes()
    finally:
        ray.shutdown()
