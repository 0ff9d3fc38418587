"""Sharded, replicated collections on a local Ray instance: 3 shards x 2 replicas holding real
SciFact vectors give exactly an unsharded exact search's results; killing a replica actor mid-way
fails no search and loses no acknowledged write, and the restarted replica converges to its
sibling; bad layouts and a Ray address that does not answer are refused at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nestvec
from nestvec.catalog import Catalog
from nestvec.cluster.distributed import DistributedCollection
from nestvec.cluster.ops import Op, shard_of
from nestvec.cluster.ray_backend import RayBackend
from nestvec.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from realdata import shipped_embeddings

IDS, VECTORS = shipped_embeddings("scifact")
N = 3000


@pytest.fixture(scope="module")
def backend() -> Iterator[RayBackend]:
    import ray

    yield RayBackend("", num_cpus=2)
    ray.shutdown()


@pytest.fixture()
def catalog(backend: RayBackend, tmp_path: Path) -> Iterator[Catalog]:
    catalog = Catalog(tmp_path / "data", cluster=backend)
    yield catalog
    for name in catalog.list_collections():
        catalog.drop_collection(name)
    catalog.close()


def _kill(collection: DistributedCollection, shard: int, replica: int) -> None:
    collection.backend.kill(collection.replicas[shard][replica], restart=True)


def test_ids_keep_their_shard_and_ops_round_trip() -> None:
    owners = shard_of(IDS[:1000], 3)
    assert set(owners.tolist()) == {0, 1, 2} and np.array_equal(owners, shard_of(IDS[:1000], 3))
    assert shard_of(["4983"], 3).tolist() == [int.from_bytes(__import__("hashlib").blake2b(
        b"4983", digest_size=8).digest(), "big") % 3]
    op = Op("upsert", ["a", "b"], ["x", None], [{"k": 1}, {}], VECTORS[:2])
    back = Op.from_bytes(op.to_bytes())
    assert back.ids == op.ids and back.texts == op.texts and back.metadata == op.metadata
    assert back.vectors is not None and np.array_equal(back.vectors, VECTORS[:2])


def test_sharded_search_equals_one_unsharded_exact_collection(catalog: Catalog, tmp_path: Path) -> None:
    sharded = catalog.create_collection("sci", encoder=None, dim=384, codec="int8", shards=3, replicas=2)
    assert isinstance(sharded, DistributedCollection)
    single = nestvec.connect(tmp_path / "single").create_collection("sci", encoder=None, dim=384, codec="int8",
                                                                     index="flat")
    for col in (sharded, single):
        col.fit_codec(VECTORS[:N])  # the same codec on both sides, so scores are the same numbers
        col.upsert(IDS[:N], vectors=VECTORS[:N], texts=[f"doc {i}" for i in range(N)],
                   metadata=[{"even": i % 2 == 0} for i in range(N)])
    assert sharded.count() == single.count() == N
    status = sharded.status()
    assert len(status) == 6 and all(r["live"] and r["codec_fitted"] and r["applied"] == r["head"] for r in status)
    assert sum(r["count"] for r in status if r["replica"] == 0) == N
    queries = VECTORS[N:N + 40]
    for kwargs in ({}, {"filter": {"even": True}}):
        got, want = sharded.search_batch(queries, k=10, **kwargs), single.search_batch(queries, k=10, **kwargs)
        assert [[h.id for h in row] for row in got] == [[h.id for h in row] for row in want]
        assert np.allclose([[h.score for h in row] for row in got], [[h.score for h in row] for row in want])
        assert got.missing_shards == ()
    hit = sharded.search(VECTORS[7], k=1)[0]
    assert hit.id == IDS[7] and hit.text == "doc 7" and hit.metadata == {"even": False}
    records = sharded.get([IDS[3], "missing", IDS[2]])
    assert [r.id if r else None for r in records] == [IDS[3], None, IDS[2]]
    assert sharded.delete([IDS[3], "missing"]) == 1 and sharded.count() == N - 1
    assert IDS[3] not in [h.id for h in sharded.search(VECTORS[3], k=5)]
    digests = sharded.digests()
    assert all(a == b for a, b in digests) and len({d for row in digests for d in row}) == 3


def test_the_codec_is_fitted_once_across_shards_and_shared(catalog: Catalog) -> None:
    col = catalog.create_collection("auto", encoder=None, dim=384, codec="int8", shards=3, replicas=1)
    assert isinstance(col, DistributedCollection)
    col.upsert(IDS[:500], vectors=VECTORS[:500])
    assert not col.codec.fitted and not any(r["codec_fitted"] for r in col.status())  # still staged, exact
    col.upsert(IDS[500:1500], vectors=VECTORS[500:1500])
    assert col.codec.fitted and all(r["codec_fitted"] for r in col.status())
    assert col.search(VECTORS[1200], k=1)[0].id == IDS[1200]


def test_killing_a_replica_during_searches_fails_none(catalog: Catalog) -> None:
    col = catalog.create_collection("k", encoder=None, dim=384, codec="int8", shards=3, replicas=2)
    assert isinstance(col, DistributedCollection)
    col.upsert(IDS[:N], vectors=VECTORS[:N])
    failures: list[BaseException] = []
    answered = 0
    deadline = time.monotonic() + 8.0
    killed = False
    while time.monotonic() < deadline:
        if not killed and answered == 20:
            _kill(col, 1, 0)
            _kill(col, 2, 1)
            killed = True
        try:
            assert col.search(VECTORS[answered % N], k=3)[0].id == IDS[answered % N]
        except Exception as err:  # any failed search fails the test below
            failures.append(err)
        answered += 1
    assert killed and failures == [] and answered > 40
    col.wait_healthy(60)
    assert all(a == b for a, b in col.digests())


def test_killing_a_replica_during_upserts_loses_no_acknowledged_write(catalog: Catalog) -> None:
    col = catalog.create_collection("w", encoder=None, dim=384, codec="int8", shards=3, replicas=2)
    assert isinstance(col, DistributedCollection)
    acknowledged: list[str] = []
    errors: list[BaseException] = []

    def writer() -> None:
        for lo in range(0, N, 100):
            try:
                col.upsert(IDS[lo:lo + 100], vectors=VECTORS[lo:lo + 100])
                acknowledged.extend(IDS[lo:lo + 100])
            except Exception as err:
                errors.append(err)

    pid = {(r["shard"], r["replica"]): r["pid"] for r in col.status()}[(0, 1)]
    thread = threading.Thread(target=writer)
    thread.start()
    while len(acknowledged) < 600:
        time.sleep(0.01)
    _kill(col, 0, 1)
    thread.join(120)
    assert errors == [] and len(acknowledged) == N  # the live sibling took every write
    col.wait_healthy(60)
    assert col.count() == N
    found = col.get(acknowledged)
    assert all(r is not None for r in found)
    digests = col.digests()
    assert all(a == b for a, b in digests)  # the restarted replica replayed what it missed
    status = {(r["shard"], r["replica"]): r for r in col.status()}
    assert status[(0, 1)]["applied"] == status[(0, 0)]["applied"] == status[(0, 0)]["head"]
    assert status[(0, 1)]["pid"] != pid  # it was restarted by Ray, and caught up


def test_a_shard_without_live_replicas_is_named_unless_partial_results_are_accepted(catalog: Catalog) -> None:
    col = catalog.create_collection("p", encoder=None, dim=384, codec="fp16", shards=3, replicas=1)
    assert isinstance(col, DistributedCollection)
    col.upsert(IDS[:600], vectors=VECTORS[:600])
    col.replicas[2][0].live = False  # as when its node is gone: no replica of shard 2 answers
    col._closed.set()  # keep the healer from bringing it back during the check
    with pytest.raises(UnavailableError, match="shard 2"):
        col.search(VECTORS[0], k=5)
    partial = col.search_batch(VECTORS[:3], k=5, allow_partial=True)
    assert partial.missing_shards == (2,) and all(len(row) == 5 for row in partial)
    owners = shard_of([h.id for row in partial for h in row], 3)
    assert 2 not in owners.tolist()
    with pytest.raises(UnavailableError, match="shard 2"):
        col.upsert([i for i in IDS[600:700] if shard_of([i], 3)[0] == 2][:1], vectors=VECTORS[600:601])


def test_bad_layouts_and_unreachable_ray_are_clear_errors(catalog: Catalog, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for shards, replicas, field in ((0, 1, "shards"), (2, 0, "replicas"), (1.5, 1, "shards")):
        with pytest.raises(InvalidArgumentError, match=field):
            catalog.create_collection("bad", encoder=None, dim=8, shards=shards, replicas=replicas)  # type: ignore[arg-type]
    assert catalog.list_collections() == []
    monkeypatch.setattr(catalog.cluster, "nodes", lambda: ["a", "b"])  # a two-node cluster
    with pytest.raises(InvalidArgumentError, match=r"3 replicas .* 2"):
        catalog.create_collection("wide", encoder=None, dim=8, shards=1, replicas=3)
    monkeypatch.undo()
    with pytest.raises(FailedPreconditionError, match="Ray"):
        nestvec.connect(tmp_path / "plain").create_collection("s", encoder=None, dim=8, shards=2)
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="does not answer"):
        RayBackend("127.0.0.1:9")
    assert time.monotonic() - started < 10


def test_bad_input_changes_nothing(catalog: Catalog) -> None:
    col = catalog.create_collection("b", encoder=None, dim=384, codec="fp16", shards=2, replicas=2)
    col.upsert(IDS[:10], vectors=VECTORS[:10])
    bad: list[tuple[Any, type[Exception], str]] = [
        (lambda: col.upsert(["x"], vectors=np.ones((1, 5))), InvalidArgumentError, "vectors"),
        (lambda: col.upsert(["x", "x"], vectors=VECTORS[:2]), InvalidArgumentError, "ids"),
        (lambda: col.upsert(["x"], vectors=np.full((1, 384), np.nan)), InvalidArgumentError, "vectors"),
        (lambda: col.search(VECTORS[0], k=0), InvalidArgumentError, "k"),
        (lambda: col.search(VECTORS[0], k=3, filter={"$bad": 1}), InvalidArgumentError, "filter"),
    ]
    for call, error, field in bad:
        with pytest.raises(error, match=field):
            call()
    assert col.count() == 10 and all(r["applied"] == r["head"] for r in col.status())  # type: ignore[union-attr]


def test_the_grpc_front_door_serves_sharded_collections_to_the_same_client(backend: RayBackend, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """serve --ray: the unchanged remote client creates, writes, searches a sharded collection
    (texts encoded by the server), gets partial results named, and `cluster status` reports it."""
    from nestvec.cli import main
    from nestvec.client.remote import RemoteClient
    from nestvec.service.server import build_server

    catalog = Catalog(tmp_path / "served", cluster=backend)
    server, port = build_server(catalog, address="127.0.0.1:0")
    server.start()
    try:
        client = RemoteClient(f"grpc://127.0.0.1:{port}")
        col = client.create_collection("texts", codec="fp16", shards=2, replicas=2)
        col.upsert(["wing", "liver", "star"], texts=["Shock waves on a swept wing.", "Gene expression in mouse liver.",
                                                     "Spectra of distant stars."])
        assert col.count() == 3 and col.search("supersonic aerodynamics", k=1)[0].id == "wing"
        assert [row[0].id for row in col.search_batch(["liver genes", "stellar light"], k=1)] == ["liver", "star"]
        assert col.info()["cluster"]["shards"] == 2
        with pytest.raises(InvalidArgumentError, match="replicas"):
            client.create_collection("bad", shards=2, replicas=0)
        opened = catalog.get_collection("texts")
        assert isinstance(opened, DistributedCollection)
        opened.replicas[0][0].live = opened.replicas[0][1].live = False
        opened._closed.set()  # no healing during the check
        partial = col.search("supersonic aerodynamics", k=3, allow_partial=True)
        assert partial.missing_shards == (0,) and len(partial) == sum(shard_of(["wing", "liver", "star"], 2) == 1)
        assert main(["cluster", "status", "--url", f"grpc://127.0.0.1:{port}"]) == 0
        out = capsys.readouterr().out
        assert "texts: 2 shards x 2 replicas" in out and out.count(" live ") == 2
        client.close()
    finally:
        server.stop(2).wait()
        for name in catalog.list_collections():
            catalog.drop_collection(name)
        catalog.close()
