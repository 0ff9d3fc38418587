"""Auth: every RPC without a key, with wrong keys, a read-only key and the admin key; TLS refuses plaintext.

Two `nestvec serve` processes (one plaintext, one TLS with a fresh self-signed certificate), each with
an admin key and a read-only key, both random and distinctive. Every RPC the server offers (the
nestvec services from their descriptors, the standard health service, server reflection; the list is
checked against what reflection itself reports, so a new service cannot be left out) is called with
a valid request as each of: no key, a wrong key (as a bearer token and as x-api-key), the admin key
cut by one character, the admin key plus one, the admin key under another scheme ("Basic"), the
read-only key (both headers) and the admin key. Expected:

- nestvec RPCs without a valid key: UNAUTHENTICATED; read-only key: reads OK, writes PERMISSION_DENIED
  (and the data unchanged after them); admin key: OK.
- grpc.health.v1.Health: open (OK) to everyone, as load balancers and Kubernetes probes call it
  without credentials; it tells only SERVING or not.
- Server reflection: needs a key (any valid one): it describes the whole API.
- The TLS server refuses a plaintext channel (UNAVAILABLE) and a client that does not trust its
  certificate; plaintext was never offered on its port.
- No key (nor its random part) appears in the servers' logs, in any status detail, metadata or reply,
  in the text of any client-side error, or in any file of the data folders.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from bench.tortures._server import REPO, ServerProcess, self_signed_cert
from nestvec.wire._pb.nestvec.v1 import nestvec_pb2 as pb

NAME = "auth"
DOCS = 50
COLLECTION = "docs"
SCRATCH = "auth-scratch"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
WRITES = frozenset({"Create", "Drop", "Upsert", "UpsertStream", "Delete"})
JSONLike = dict[str, Any]


@dataclass(frozen=True)
class Rpc:
    service: str
    name: str
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def write(self) -> bool:
        return self.service.startswith("nestvec.") and self.name in WRITES


def every_rpc() -> list[Rpc]:
    """From the descriptors the server registers: the nestvec services, health and reflection."""
    services = [*pb.DESCRIPTOR.services_by_name.values(), health_pb2.DESCRIPTOR.services_by_name["Health"],
                reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]
    return [Rpc(s.full_name, m.name, m.client_streaming, m.server_streaming) for s in services for m in s.methods]


@dataclass
class Data:
    ids: list[str]
    vectors: np.ndarray

    @classmethod
    def load(cls) -> Data:
        import sys

        sys.path.insert(0, str(REPO / "tests"))
        from realdata import shipped_embeddings

        ids, vectors = shipped_embeddings("scifact")
        return cls(ids[:DOCS], np.ascontiguousarray(vectors[:DOCS], dtype="<f4"))

    def vectors_pb(self, rows: slice) -> pb.Vectors:
        block = self.vectors[rows]
        return pb.Vectors(data=block.tobytes(), dim=block.shape[1], count=block.shape[0])


def requests_for(rpc: Rpc, data: Data, writer: bool) -> list[Message]:
    """A valid request for each RPC: the admin's writes go to a scratch collection it creates and
    drops; everyone else's writes aim at the real collection (and must change nothing)."""
    target = SCRATCH if writer else COLLECTION
    one = data.vectors_pb(slice(0, 1))
    made: dict[str, Callable[[], list[Message]]] = {
        "/nestvec.v1.Collections/Create": lambda: [pb.CreateCollectionRequest(
            name=SCRATCH if writer else f"{SCRATCH}-denied", no_encoder=True, dim=data.vectors.shape[1])],
        "/nestvec.v1.Collections/Describe": lambda: [pb.DescribeCollectionRequest(name=COLLECTION)],
        "/nestvec.v1.Collections/List": lambda: [pb.ListCollectionsRequest()],
        "/nestvec.v1.Collections/Drop": lambda: [pb.DropCollectionRequest(name=target)],
        "/nestvec.v1.Points/Upsert": lambda: [pb.UpsertRequest(collection=target, points=[
            pb.Point(id="auth-new", text="written", metadata_json='{"by": "auth"}')], vectors=one)],
        "/nestvec.v1.Points/UpsertStream": lambda: [pb.UpsertRequest(collection=target, points=[
            pb.Point(id=f"auth-stream-{j}")], vectors=data.vectors_pb(slice(j, j + 1))) for j in range(2)],
        "/nestvec.v1.Points/Delete": lambda: [pb.DeleteRequest(collection=target, ids=[data.ids[0], "auth-new"])],
        "/nestvec.v1.Points/Get": lambda: [pb.GetRequest(collection=COLLECTION, ids=data.ids[:3])],
        "/nestvec.v1.Points/Count": lambda: [pb.CountRequest(collection=COLLECTION)],
        "/nestvec.v1.Points/Search": lambda: [pb.SearchRequest(collection=COLLECTION, vector=one, k=3)],
        "/nestvec.v1.Points/SearchBatch": lambda: [pb.SearchBatchRequest(
            collection=COLLECTION, vectors=data.vectors_pb(slice(0, 2)), k=3)],
        "/nestvec.v1.Diagnostics/Stats": lambda: [pb.StatsRequest()],
        f"/{HEALTH}/Check": lambda: [health_pb2.HealthCheckRequest()],
        f"/{HEALTH}/List": lambda: [health_pb2.HealthListRequest()],
        f"/{HEALTH}/Watch": lambda: [health_pb2.HealthCheckRequest(service="nestvec.v1.Points")],
        f"/{REFLECTION}/ServerReflectionInfo": lambda: [reflection_pb2.ServerReflectionRequest(list_services="")],
    }
    if rpc.path not in made:
        raise KeyError(f"no request for {rpc.path}: add one to requests_for so every RPC is covered")
    return made[rpc.path]()


def write_order(rpcs: list[Rpc]) -> list[Rpc]:
    """Create first and Drop last, so the admin's writes find their scratch collection."""
    rank = {"Create": 0, "Drop": 2}
    return sorted(rpcs, key=lambda r: rank.get(r.name, 1) if r.service.startswith("nestvec.") else 1)


@dataclass
class Reply:
    code: str
    details: str
    seen: list[str]  # every text the client got back: details, metadata, reply bytes, the error's own text
    replies: list[bytes]


def call(channel: grpc.Channel, rpc: Rpc, requests: list[Message], metadata: tuple[tuple[str, str], ...],
         timeout_s: float = 20.0) -> Reply:
    """One call through grpc's generic multicallables, of the RPC's own shape."""
    payloads = [r.SerializeToString() for r in requests]
    replies: list[bytes] = []
    seen: list[str] = []
    try:
        if rpc.client_streaming and rpc.server_streaming:
            stream = channel.stream_stream(rpc.path)(iter(payloads), timeout=timeout_s, metadata=metadata)
            replies = list(stream)
            seen += [f"{k}={v!r}" for k, v in (stream.initial_metadata() or ()) + (stream.trailing_metadata() or ())]
        elif rpc.server_streaming:  # Health.Watch: its first answer, then hang up
            stream = channel.unary_stream(rpc.path)(payloads[0], timeout=timeout_s, metadata=metadata)
            replies = [next(stream)]
            seen += [f"{k}={v!r}" for k, v in stream.initial_metadata() or ()]
            stream.cancel()
        else:
            reply, done = channel.unary_unary(rpc.path).with_call(payloads[0], timeout=timeout_s, metadata=metadata)
            replies = [reply]
            seen += [f"{k}={v!r}" for k, v in (done.initial_metadata() or ()) + (done.trailing_metadata() or ())]
        code, details = "OK", ""
    except grpc.RpcError as err:
        failed: Any = err
        code, details = failed.code().name, failed.details() or ""
        seen += [details, str(err), repr(err)]
        seen += [f"{k}={v!r}" for k, v in failed.trailing_metadata() or ()]
    seen += [r.decode("latin-1") for r in replies]
    return Reply(code, details, seen, replies)


def identities(admin: str, reader: str, wrong: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """Who calls, as the metadata they send."""
    return {
        "no key": (),
        "wrong key": (("authorization", f"Bearer {wrong}"),),
        "wrong x-api-key": (("x-api-key", wrong),),
        "admin key cut": (("authorization", f"Bearer {admin[:-1]}"),),
        "admin key + 1": (("authorization", f"Bearer {admin}0"),),
        "admin key, Basic": (("authorization", f"Basic {admin}"),),
        "read-only key": (("authorization", f"Bearer {reader}"),),
        "read-only x-api-key": (("x-api-key", reader),),
        "admin key": (("authorization", f"Bearer {admin}"),),
    }


def expected(rpc: Rpc, who: str) -> frozenset[str]:
    """The codes a caller may get. Health answers everyone alike; its List is UNIMPLEMENTED by the
    servicer of grpcio-health-checking 1.85 (the proto gained List before the servicer did)."""
    if rpc.service == HEALTH:
        return frozenset({"OK", "UNIMPLEMENTED"} if rpc.name == "List" else {"OK"})
    if who == "admin key":
        return frozenset({"OK"})
    if who.startswith("read-only"):
        return frozenset({"PERMISSION_DENIED" if rpc.write else "OK"})
    return frozenset({"UNAUTHENTICATED"})


def seed(channel: grpc.Channel, admin: str, data: Data) -> None:
    """The collection every caller reads (and the denied writes aim at)."""
    md = (("authorization", f"Bearer {admin}"),)
    create = pb.CreateCollectionRequest(name=COLLECTION, no_encoder=True, dim=data.vectors.shape[1])
    upsert = pb.UpsertRequest(collection=COLLECTION, points=[pb.Point(id=i, text=f"doc {i}") for i in data.ids],
                              vectors=data.vectors_pb(slice(None)))
    seeding: list[tuple[str, Message]] = [("/nestvec.v1.Collections/Create", create),
                                          ("/nestvec.v1.Points/Upsert", upsert)]
    for path, request in seeding:
        channel.unary_unary(path)(request.SerializeToString(), metadata=md, timeout=60)


def state(channel: grpc.Channel, admin: str, data: Data) -> JSONLike:
    """What denied writes must leave alone: the collection list, the count, the first documents."""
    md = (("authorization", f"Bearer {admin}"),)
    names = pb.ListCollectionsResponse.FromString(channel.unary_unary("/nestvec.v1.Collections/List")(
        pb.ListCollectionsRequest().SerializeToString(), metadata=md, timeout=20)).names
    count = pb.CountResponse.FromString(channel.unary_unary("/nestvec.v1.Points/Count")(
        pb.CountRequest(collection=COLLECTION).SerializeToString(), metadata=md, timeout=20)).count
    got = pb.GetResponse.FromString(channel.unary_unary("/nestvec.v1.Points/Get")(
        pb.GetRequest(collection=COLLECTION, ids=[*data.ids[:3], "auth-new"]).SerializeToString(), metadata=md,
        timeout=20))
    return {"names": sorted(names), "count": int(count), "found": list(got.found)}


def check_server(server: ServerProcess, label: str, keys: dict[str, str], data: Data) -> JSONLike:
    """The whole table against one server, then its TLS checks (for the TLS one)."""
    rpcs = write_order(every_rpc())
    table: dict[str, dict[str, str]] = {rpc.path: {} for rpc in rpcs}
    mismatches: list[str] = []
    seen: list[str] = []
    denied_writes_changed: list[str] = []
    with server.channel() as channel:
        seed(channel, keys["admin"], data)
        before = state(channel, keys["admin"], data)
        for who, metadata in identities(keys["admin"], keys["reader"], keys["wrong"]).items():
            for rpc in rpcs:
                reply = call(channel, rpc, requests_for(rpc, data, writer=who == "admin key"), metadata)
                table[rpc.path][who] = reply.code
                seen += reply.seen
                want = expected(rpc, who)
                if reply.code not in want:
                    mismatches.append(f"{label}: {rpc.path} as {who}: {reply.code} ({reply.details[:120]}), "
                                      f"expected {' or '.join(sorted(want))}")
                if rpc.write and reply.code != "OK" and (now := state(channel, keys["admin"], data)) != before:
                    denied_writes_changed.append(f"{label}: {rpc.path} as {who}: {before} -> {now}")
                    before = now
                if rpc.service == REFLECTION and who == "admin key" and reply.replies:
                    listed = reflection_pb2.ServerReflectionResponse.FromString(reply.replies[0])
                    offered = {s.name for s in listed.list_services_response.service}
                    covered = {r.service for r in rpcs}
                    if offered != covered:
                        mismatches.append(f"{label}: reflection offers {sorted(offered)}, the table covers "
                                          f"{sorted(covered)}")
        # Garbage bytes as a reader and as the admin: what the server logs about requests it cannot parse.
        for key in (keys["reader"], keys["admin"]):
            try:
                channel.unary_unary("/nestvec.v1.Points/Search")(b"\xff\xff\xff", timeout=10,
                                                                 metadata=(("authorization", f"Bearer {key}"),))
            except grpc.RpcError as err:
                seen += [str(err)]
    for rpc in rpcs:
        if rpc.service == HEALTH and len(set(table[rpc.path].values())) > 1:
            mismatches.append(f"{label}: {rpc.path} answers callers differently: {table[rpc.path]}")
    out: JSONLike = {"table": table, "mismatches": mismatches, "denied_writes_changed": denied_writes_changed,
                     "calls": sum(len(v) for v in table.values())}
    if server.tls:
        out["tls"] = tls_checks(server, keys["admin"], seen)
        for what, code in out["tls"].items():
            if code != "UNAVAILABLE":
                mismatches.append(f"{label}: {what} got {code}, expected UNAVAILABLE")
    out["seen"] = seen
    return out


def tls_checks(server: ServerProcess, admin: str, seen: list[str]) -> dict[str, str]:
    """A plaintext channel, and a TLS client trusting another certificate, must both be refused."""
    other_cert, _ = self_signed_cert(server.data.parent, "other")
    out = {}
    list_rpc = Rpc("nestvec.v1.Collections", "List", False, False)
    check_rpc = Rpc(HEALTH, "Check", False, False)
    md = (("authorization", f"Bearer {admin}"),)
    for what, channel in [("plaintext channel", server.channel(plaintext=True)),
                          ("client trusting another certificate", server.channel(root_cert=other_cert))]:
        with channel:
            for rpc, request in [(list_rpc, pb.ListCollectionsRequest()), (check_rpc, health_pb2.HealthCheckRequest())]:
                reply = call(channel, rpc, [request], md, timeout_s=5)
                out[f"{what}: {rpc.name}"] = reply.code
                seen += reply.seen
    return out


def leaks(texts: dict[str, str], keys: dict[str, str]) -> list[str]:
    """Where any key shows up, or the first 12 characters of its random part (which also catches the
    near-miss keys sent, and a key cut or quoted in part)."""
    found = []
    for where, text in texts.items():
        for name, key in keys.items():
            for needle in (key, key.split("-")[-1][:12]):
                if needle in text:
                    found.append(f"{name} key in {where}")
                    break
    return sorted(set(found))


def data_files(folder: Path) -> dict[str, str]:
    return {f"data file {p.relative_to(folder)}": p.read_bytes().decode("latin-1")
            for p in folder.rglob("*") if p.is_file() and p.stat().st_size < 64 << 20}


def run(args: argparse.Namespace) -> JSONLike:
    started = time.perf_counter()
    token = secrets.token_hex(10)
    keys = {"admin": f"adm1n-{token}", "reader": f"r3ader-{secrets.token_hex(10)}",
            "wrong": f"wr0ng-{secrets.token_hex(10)}"}
    data = Data.load()
    with tempfile.TemporaryDirectory(prefix="nestvec-auth-") as tmp:
        root = Path(tmp)
        cert = self_signed_cert(root)
        servers = {label: ServerProcess(root / label / "data", root / f"{label}.log", api_keys=[keys["admin"]],
                                        read_only_keys=[keys["reader"]], tls=cert if label == "tls" else None)
                   for label in (["plaintext"] if args.plaintext else []) + (["tls"] if args.tls else [])}
        results: dict[str, JSONLike] = {}
        try:
            for server in servers.values():  # both start at once
                server.data.parent.mkdir(parents=True)
                server.start()
            for server in servers.values():
                server.wait_ready()
            for label, server in servers.items():
                results[label] = check_server(server, label, keys, data)
        finally:
            exits = {label: server.stop() for label, server in servers.items()}
        texts: dict[str, str] = {}
        for label, server in servers.items():
            texts[f"{label} server log"] = server.log_text()
            texts.update({f"{label} {k}": v for k, v in data_files(server.data).items()})
        for label, result in results.items():
            texts[f"{label} replies and errors"] = "\n".join(result.pop("seen"))
    found = leaks(texts, keys)
    mismatches = [m for r in results.values() for m in r["mismatches"]]
    changed = [c for r in results.values() for c in r["denied_writes_changed"]]
    rpcs = every_rpc()
    return {
        "passed": bool(results) and not mismatches and not changed and not found and all(
            code in (0, -15) for code in exits.values()),
        "rpcs": [r.path for r in rpcs], "identities": list(identities("a", "r", "w")),
        "servers": results, "mismatches": mismatches, "denied_writes_changed": changed, "key_leaks": found,
        "scanned_bytes": sum(len(t) for t in texts.values()), "server_exits": exits,
        "calls": sum(r["calls"] for r in results.values()), "seconds": round(time.perf_counter() - started, 1),
    }


CODE_COLORS = {"OK": "#4c9a4c", "UNAUTHENTICATED": "#9f9f9f", "PERMISSION_DENIED": "#e0a030"}


def plot(result: JSONLike, ax: Any) -> None:
    """Codes per RPC (rows) and caller (columns) for one server; a cross marks an unexpected code."""
    from matplotlib.colors import ListedColormap

    label = "tls" if "tls" in result["servers"] else next(iter(result["servers"]))
    table = result["servers"][label]["table"]
    rpcs, who = list(table), result["identities"]
    codes = [*CODE_COLORS, "other"]
    grid = np.array([[codes.index(table[r].get(w, "other")) if table[r].get(w) in CODE_COLORS else len(codes) - 1
                      for w in who] for r in rpcs])
    ax.imshow(grid, cmap=ListedColormap([*CODE_COLORS.values(), "#d04040"]), vmin=0, vmax=len(codes) - 1,
              aspect="auto")
    for m in result["mismatches"]:
        for i, r in enumerate(rpcs):
            for j, w in enumerate(who):
                if m.startswith(f"{label}: {r} as {w}:"):
                    ax.text(j, i, "x", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(who)), who, rotation=60, ha="right", fontsize=6)
    ax.set_yticks(range(len(rpcs)), [r.rsplit("/", 2)[-2].split(".")[-1] + "." + r.rsplit("/", 1)[-1] for r in rpcs],
                  fontsize=6)
    ax.set_xlabel(f"{label} server: green OK, grey UNAUTHENTICATED, orange PERMISSION_DENIED, red other",
                  fontsize=7)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plaintext", action=argparse.BooleanOptionalAction, default=True,
                        help="check a plaintext server")
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True, help="check a TLS server")
