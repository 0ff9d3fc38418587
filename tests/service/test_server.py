"""A real server on localhost: auth, TLS, health, reflection, streaming, limits, stats, shutdown."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from nestvec.catalog import Catalog
from nestvec.client.remote import RemoteClient
from nestvec.collection import Collection
from nestvec.errors import InvalidArgumentError, PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError
from nestvec.wire._pb.nestvec.v1 import nestvec_pb2 as pb
from realdata import shipped_embeddings
from servers import ADMIN_KEY, READER_KEY, RunningServer

IDS, VECTORS = shipped_embeddings("scifact")


def _collection(client: RemoteClient, n: int = 200):  # type: ignore[no-untyped-def]
    col = client.create_collection("sci", encoder=None, dim=384, codec="fp8")
    col.upsert(IDS[:n], vectors=VECTORS[:n], texts=[f"t{i}" for i in range(n)])
    return col


def test_api_keys_are_enforced(server: RunningServer) -> None:
    admin = server.client()
    col = _collection(admin)
    for client in (server.client(api_key=None), server.client(api_key="wrong")):
        with pytest.raises(UnauthenticatedError):
            client.list_collections()
        with pytest.raises(UnauthenticatedError):
            client.get_collection("sci")
    reader = server.client(api_key=READER_KEY)
    reader_col = reader.get_collection("sci")
    assert reader_col.search(VECTORS[3], k=1)[0].id == IDS[3]
    for write in (lambda: reader_col.upsert(["new"], vectors=VECTORS[:1]), lambda: reader_col.delete([IDS[0]]),
                  lambda: reader.drop_collection("sci"),
                  lambda: reader.create_collection("other", encoder=None, dim=4)):
        with pytest.raises(PermissionDeniedError):
            write()
    assert col.count() == 200 and admin.list_collections() == ["sci"] and col.get(["new"]) == [None]


def test_health_is_open_and_serving(server: RunningServer) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "nestvec.v1.Points", "nestvec.v1.Collections"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_generic_reflection_client_lists_services_and_calls_search(server: RunningServer) -> None:
    _collection(server.client())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    channel = grpc.intercept_channel(channel, _ApiKey(ADMIN_KEY))
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"nestvec.v1.Collections", "nestvec.v1.Points", "nestvec.v1.Diagnostics", "grpc.health.v1.Health"} <= services
    pool = descriptor_pool.DescriptorPool(database)
    method = pool.FindServiceByName("nestvec.v1.Points").methods_by_name["Search"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    vector = np.asarray(VECTORS[7], dtype="<f4")
    request = request_cls(collection="sci", k=3, vector={"data": vector.tobytes(), "dim": 384, "count": 1})
    call = channel.unary_unary("/nestvec.v1.Points/Search", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response_cls.FromString)
    reply = call(request, timeout=5)
    assert reply.hits[0].id == IDS[7] and len(reply.hits) == 3
    channel.close()


class _ApiKey(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, key: str) -> None:
        self.key = key

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(_Details(details, [*(details.metadata or ()), ("authorization", f"Bearer {self.key}")]),
                            request)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(_Details(details, [*(details.metadata or ()), ("authorization", f"Bearer {self.key}")]),
                            requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata) -> None:  # type: ignore[no-untyped-def]
        self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
        self.wait_for_ready, self.compression = base.wait_for_ready, base.compression
        self.metadata = metadata


def test_upsert_stream_acknowledges_each_batch_and_stops_at_a_bad_one(server: RunningServer) -> None:
    client = server.client()
    client.create_collection("s", encoder=None, dim=384, codec="fp16")
    batches = [pb.UpsertRequest(collection="s", points=[pb.Point(id=i) for i in IDS[b * 100:(b + 1) * 100]],
                                vectors=_vectors(VECTORS[b * 100:(b + 1) * 100])) for b in range(3)]
    acks = client._stream(client.points.UpsertStream, batches)
    assert [(a.batch, a.written) for a in acks] == [(0, 100), (1, 100), (2, 100)]
    bad = pb.UpsertRequest(collection="s", points=[pb.Point(id="a"), pb.Point(id="b")], vectors=_vectors(np.ones((1, 384))))
    good = pb.UpsertRequest(collection="s", points=[pb.Point(id="c")], vectors=_vectors(np.ones((1, 384))))
    with pytest.raises(InvalidArgumentError, match="batch 1"):
        client._stream(client.points.UpsertStream, [good, bad, good])
    col = client.get_collection("s")
    assert col.count() == 301 and col.get(["c", "a"])[1] is None  # batch 0 committed, batch 1 nothing


def _vectors(matrix: np.ndarray) -> pb.Vectors:
    from nestvec.wire.convert import to_pb_vectors

    return to_pb_vectors(matrix)


def test_message_limits_and_client_side_splitting(tmp_path: Path) -> None:
    running = RunningServer(tmp_path / "small", max_message_bytes=1 << 20)
    try:
        big = RemoteClient(running.url, max_message_bytes=8 << 20)  # client allows more than the server
        col = big.create_collection("m", encoder=None, dim=384, codec="fp16")
        with pytest.raises(ResourceExhaustedError):
            col.upsert(IDS[:1500], vectors=VECTORS[:1500])  # ~2.3 MB in one message
        assert col.count() == 0
        fitting = RemoteClient(running.url, max_message_bytes=1 << 20)
        assert fitting.get_collection("m").upsert(IDS[:1500], vectors=VECTORS[:1500]) == 1500  # split in batches
        assert col.count() == 1500 and col.search(VECTORS[1400], k=1)[0].id == IDS[1400]
    finally:
        running.stop()


def test_stats_report_calls_and_latency(server: RunningServer) -> None:
    client = server.client()
    col = _collection(client, 50)
    for i in range(20):
        col.search(VECTORS[i], k=5)
    with pytest.raises(InvalidArgumentError):
        col.search(VECTORS[0], k=5, filter={"nofield": 1})
    stats = {row["method"]: row for row in client.stats()}
    search = stats["/nestvec.v1.Points/Search"]
    assert search["calls"] == 21 and search["errors"] == 1 and 0 < search["p50_ms"] <= search["p99_ms"]


def test_graceful_shutdown_completes_in_flight_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    running = RunningServer(tmp_path / "g")
    client = running.client()
    col = client.create_collection("g", encoder=None, dim=384, codec="fp16")
    original = Collection.upsert
    entered = threading.Event()

    def slow_upsert(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        entered.set()
        time.sleep(0.5)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Collection, "upsert", slow_upsert)
    result: list[int] = []
    writer = threading.Thread(target=lambda: result.append(col.upsert(IDS[:100], vectors=VECTORS[:100])))
    writer.start()
    assert entered.wait(5)
    running.server.stop(10).wait()  # stop while the write is in flight
    writer.join(10)
    assert result == [100]
    running.catalog.close()
    from nestvec import connect

    assert connect(tmp_path / "g").get_collection("g").count() == 100


def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    running = RunningServer(tmp_path / "tls", tls_cert=cert, tls_key=key, api_keys=[ADMIN_KEY])
    try:
        secure = RemoteClient(f"grpcs://localhost:{running.port}", api_key=ADMIN_KEY, root_certificates=cert)
        secure.create_collection("t", encoder=None, dim=384, codec="fp16").upsert(IDS[:5], vectors=VECTORS[:5])
        assert secure.get_collection("t").count() == 5
        plaintext = RemoteClient(f"grpc://localhost:{running.port}", api_key=ADMIN_KEY, retries=0, timeout_s=3)
        with pytest.raises(Exception, match=r"(?i)unavailable|handshake|closed|socket|connect"):
            plaintext.list_collections()
    finally:
        running.stop()


def test_nestvec_serve_opens_existing_collections_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The real command: collections already in the folder are open before health says SERVING
    (no first search pays for loading), and SIGTERM drains and exits cleanly."""
    with Catalog(tmp_path / "data") as catalog:
        catalog.create_collection("sci", encoder=None, dim=384).upsert(IDS[:300], vectors=VECTORS[:300])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nestvec.cli", "--data", str(tmp_path / "data"), "serve",
                             "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "serving" in proc.stdout.readline()  # printed once collections are open
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        client = RemoteClient(f"grpc://127.0.0.1:{port}")
        hits = client.get_collection("sci").search(VECTORS[7], k=3)
        assert hits[0].id == IDS[7]
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
