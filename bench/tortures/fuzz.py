"""API fuzzing: real and malformed gRPC requests against a live `nestvec serve` process.

The server runs as its own process (so a crash is an exit and a hang is a missed deadline) over a
data folder holding real SciFact data: "sci" (MiniLM vectors and texts, no encoder) and, unless
--no-encoder, "enc" (the bundled MiniLM encodes its texts). Every request is sent as bytes through
the generic gRPC API, so anything can be sent: well-formed messages with hostile values (huge and
"negative" k, NaN and inf, wrong dimensions, empty and 10 MB texts, deep and huge filters, unicode,
collection names with `..`, `/`, NUL or 1,000 characters), random bytes, and valid messages with
flipped, cut or spliced bytes. A fixed list of edge cases runs first in every run; then
`--cases` random ones, case i drawn from random.Random(f"{seed}:{i}") (replay one with --only).

Promises checked after each case: the process is alive; the reply came within --deadline-s (else:
a hang); its status is OK or an expected one (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
FAILED_PRECONDITION, RESOURCE_EXHAUSTED, OUT_OF_RANGE; UNAUTHENTICATED without a key), never
INTERNAL (bytes that do not parse as the request are INVALID_ARGUMENT naming the message); after
every rejected write, and every --check-every cases, a digest of the whole data (collection list,
Describe, Get of every id ever written, a probe search per collection) is unchanged; no file
appears outside the data folder, and no half-made collection folder stays inside it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import re
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2

from bench.tortures._server import REPO, ServerProcess
from nestvec.wire._pb.nestvec.v1 import nestvec_pb2 as pb
from nestvec.wire._pb.nestvec.v1 import nestvec_pb2_grpc as pb_grpc

NAME = "fuzz"
API_KEY = "fuzz-admin-key"
WRONG_KEY = "fuzz-wrong-key"
DIM = 384
SEEDED_DOCS = 300
ENCODED_DOCS = 20
BIG_TEXT = 10_000_000  # characters: "10 MB texts"
SERVER_LIMIT = 64 << 20  # the server's default --max-message-mb
EXPECTED = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION",
                      "RESOURCE_EXHAUSTED", "OUT_OF_RANGE"})
PARSE_FAILURE = "the bytes are not a "  # in the INVALID_ARGUMENT detail for unparseable bytes
WRITE_METHODS = frozenset({"Create", "Drop", "Upsert", "UpsertStream", "Delete"})
JSONLike = dict[str, Any]


# -- the methods, from the service descriptors --------------------------------------------------------
@dataclass(frozen=True)
class Method:
    path: str
    name: str
    request: type[Message]
    response: type[Message]
    stream: bool  # UpsertStream: a stream in, a stream out

    @property
    def write(self) -> bool:
        return self.name in WRITE_METHODS and self.path.startswith("/nestvec.")


def _methods() -> dict[str, Method]:
    out = {}
    for service in pb.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            out[m.name] = Method(f"/{service.full_name}/{m.name}", m.name, getattr(pb, m.input_type.name),
                                 getattr(pb, m.output_type.name), m.client_streaming)
    out["HealthCheck"] = Method("/grpc.health.v1.Health/Check", "HealthCheck", health_pb2.HealthCheckRequest,
                                health_pb2.HealthCheckResponse, False)
    return out


METHODS = _methods()


def _parses(method: Method, payload: bytes) -> bool:
    try:
        method.request.FromString(payload)
    except DecodeError:
        return False
    return True


# -- the data -------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """SciFact ids, MiniLM vectors, texts and metadata made from them (a real distribution)."""

    ids: list[str]
    vectors: np.ndarray
    texts: list[str]
    metadata: list[JSONLike]

    @classmethod
    def load(cls, n: int) -> Corpus:
        sys.path.insert(0, str(REPO / "tests"))
        from realdata import DATA, shipped_embeddings

        ids, vectors = shipped_embeddings("scifact")
        by_id: dict[str, JSONLike] = {}
        with (DATA / "scifact" / "corpus.jsonl").open(encoding="utf-8") as fh:
            for line in fh:
                doc = json.loads(line)
                by_id[doc["_id"]] = doc
        docs = [by_id[i] for i in ids[:n]]
        texts = [f"{d['title']}. {d['text']}"[:1000] for d in docs]
        metadata = [{"i": i, "year": 1990 + i % 35, "title": d["title"][:60], "even": i % 2 == 0,
                     "tags": [w for w in d["title"].lower().split()[:3]]} for i, d in enumerate(docs)]
        return cls(ids[:n], np.ascontiguousarray(vectors[:n], dtype=np.float32), texts, metadata)


# -- the cases ------------------------------------------------------------------------------------
@dataclass
class Case:
    kind: str                  # what the tables and the plot group by
    method: Method
    payloads: list[bytes]      # one request (unary) or the stream's requests
    note: str                  # a short description for a bug report
    key: str | None = API_KEY  # None: no key at all

    @property
    def write(self) -> bool:
        return self.method.write

    def expected(self) -> frozenset[str]:
        if self.key != API_KEY and self.method.path.startswith("/nestvec."):
            return frozenset({"UNAUTHENTICATED"})
        codes = set(EXPECTED)
        if self.method.name == "HealthCheck":
            codes = {"OK", "NOT_FOUND"}  # an unknown service name
            if self.payloads and not _parses(self.method, self.payloads[0]):
                codes.add("INVALID_ARGUMENT")
        if sum(len(p) for p in self.payloads) > SERVER_LIMIT or any(len(p) > SERVER_LIMIT for p in self.payloads):
            codes.add("RESOURCE_EXHAUSTED")
        return frozenset(codes)


ODD = ["\x00", "\u202e", "\ufeff", "é", "名", "😀", "\U0010ffff", "e\u0301", "\n", "\t", "\\", '"', "'", "%s", "{}",
       "${HOME}", "\x7f", "\u2028", " ", "../", "/", "ﷺ", "\u200b", "İ", "ß"]


def deep_filter(depth: int) -> str:
    """{"$and": [{"$and": [... {"i": 1} ...]}]}: recursion in the filter evaluator."""
    return '{"$and": [' * depth + '{"i": 1}' + "]}" * depth


def deep_field_filter(depth: int) -> str:
    return '{"i": ' * depth + "1" + "}" * depth


def wide_filter(width: int) -> str:
    return json.dumps({"$or": [{"i": j} for j in range(width)]})


# Hostile JSON, made once: not JSON, not an object, NaN and infinities, deep, wide, huge.
BAD_METADATA = [
    "[1, 2]", '"text"', "null", "1", "{", '{"a": }', '{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}',
    "{}", '{"": 1}', '{"\\u0000": "\\ud800"}', '{"a": 1, "a": 2}', json.dumps({"big": "x" * 100_000}),
    '{"a": ' * 50 + "1" + "}" * 50, '{"a": ' * 5000 + "1" + "}" * 5000, "[" * 100_000 + "]" * 100_000,
    json.dumps({f"k{j}": j for j in range(5000)}), '{"a": 1e999}', "\x00", '{"a": 1} trailing']
BAD_FILTERS = [
    "[]", "1", '"even"', "{", "null", '{"$nope": 1}', '{"even": {"$eq": [1]}}', '{"year": {"$gt": "x"}}',
    '{"year": {"$gt": NaN}}', '{"year": {"$lt": Infinity}}', '{"$and": []}', '{"$or": {}}', '{"nofield": 1}',
    '{"year": {}}', '{"even": true, "even": 1}', "[" * 100_000 + "]" * 100_000, '{"i": 1e999}']


class Gen:
    """Requests drawn from one random.Random: valid values mixed with hostile ones, per field."""

    def __init__(self, rng: random.Random, corpus: Corpus, escape: str, outside: Path, encoder: bool) -> None:
        self.rng, self.corpus, self.encoder = rng, corpus, encoder
        self.scratch = ["fz0", "fz1", "fz2", "fz.3", "fz-4_x", "A" * 128, "a..b"]
        self.protected = ["sci", "enc"] if encoder else ["sci"]
        self.nasty = ["", ".", "..", f"../{escape}", f"../../{escape}", f"a/../../{escape}", "/", "a/b",
                      f"{outside}/{escape}", "\x00", "sci\x00", f"\x00/../{escape}", "x" * 1000, "A" * 129,
                      "名前", "é", "-lead", ".hidden", "sci ", " sci", "SCI", "sci\n", "%2e%2e", f"..\\{escape}",
                      "~", "$HOME", "😀", "\u202esci", "a" * 100_000]

    # -- values --
    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def text(self, max_len: int = 40) -> str:
        n = self.rng.randint(0, max_len)
        alphabet = "abc xyz graphene heat cell 0123"
        return "".join(self.rng.choice(ODD) if self.chance(0.15) else self.rng.choice(alphabet) for _ in range(n))

    def name(self) -> str:
        r = self.rng.random()
        if r < 0.45:
            return self.rng.choice(self.protected)
        if r < 0.7:
            return self.rng.choice(self.scratch)
        return self.rng.choice(self.nasty) if r < 0.95 else self.text(20)

    def droppable(self) -> str:
        return self.rng.choice(self.scratch) if self.chance(0.5) else self.rng.choice(self.nasty)

    def an_id(self) -> str:
        r = self.rng.random()
        if r < 0.25:
            return self.rng.choice(self.corpus.ids)
        if r < 0.7:
            return f"fz-id-{self.rng.randrange(60)}"
        return self.rng.choice(["", "x" * 256, "x" * 257, "é" * 128, "é" * 129, "\x00", "../id", " ", "1", "-1",
                                "😀" * 64, "😀" * 65, self.text(30), "id\x00tail"])

    def ids(self, most: int = 6) -> list[str]:
        n = self.rng.choice([0, 1, 1, 2, 3, most]) if not self.chance(0.02) else self.rng.choice([500, 20_000])
        out = [self.an_id() for _ in range(n)]
        if n and self.chance(0.1):
            out.append(out[0])  # a duplicate
        return out

    def uint(self, common: list[int]) -> int:
        extremes = [0, 1, 2**31 - 1, 2**31, 2**32 - 1]
        return self.rng.choice(common) if self.chance(0.8) else self.rng.choice(extremes)

    def metadata_json(self) -> str:
        r = self.rng.random()
        if r < 0.3:
            return ""
        if r < 0.7:
            meta: JSONLike = {"i": self.rng.randrange(-5, 400), "year": self.rng.choice([1999, 2020, 1e308, -0.0]),
                              "title": self.text(12), "even": self.chance(0.5)}
            if self.chance(0.3):
                meta[self.text(6)] = self.rng.choice([None, [1, "a"], {"n": {"m": 1}}, self.text(8), 2**70])
            return json.dumps(meta)
        return self.rng.choice(BAD_METADATA)

    def vectors(self, count: int, dim: int = DIM) -> pb.Vectors:
        """Mostly right, then wrong in one way: dimension, count, byte length, NaN, inf, zero, scale."""
        rows = self.rng.choices(range(len(self.corpus.ids)), k=count)
        if dim == DIM:
            matrix = self.corpus.vectors[rows].copy()
        else:
            matrix = np.random.default_rng(self.rng.getrandbits(32)).standard_normal((count, dim)).astype(np.float32)
        r = self.rng.random()
        if r < 0.6 or count == 0:
            pass
        elif r < 0.68:
            matrix[self.rng.randrange(count), self.rng.randrange(dim)] = self.rng.choice(
                [math.nan, math.inf, -math.inf])
        elif r < 0.72:
            matrix[self.rng.randrange(count)] = 0.0
        elif r < 0.78:
            matrix *= self.rng.choice([1e38, 3.4e38, 1e-42, -1.0, 1e20])
        elif r < 0.84:
            other = self.rng.choice([1, DIM - 1, DIM + 1, 768, 3])
            matrix = np.random.default_rng(self.rng.getrandbits(32)).standard_normal((count, other)).astype(np.float32)
        message = pb.Vectors(data=np.ascontiguousarray(matrix, dtype="<f4").tobytes(), dim=matrix.shape[1],
                             count=matrix.shape[0])
        r = self.rng.random()
        if r < 0.06:
            message.count = self.rng.choice([0, count + 1, max(count - 1, 0), 2**32 - 1])
        elif r < 0.1:
            message.dim = self.rng.choice([0, 1, 2**32 - 1, message.dim * 2])
        elif r < 0.14:
            message.data = message.data[: self.rng.randrange(len(message.data) + 1)] + (b"\x00" * self.rng.randrange(3))
        return message

    def filter_json(self) -> str:
        r = self.rng.random()
        if r < 0.35:
            return ""
        if r < 0.65:
            return json.dumps(self.rng.choice([
                {"even": True}, {"year": {"$gte": 2000, "$lt": 2010}}, {"i": {"$in": [1, 2, 3, "x", None]}},
                {"$or": [{"even": False}, {"year": {"$lte": 1995}}]}, {"title": {"$ne": self.text(5)}},
                {"$and": [{"i": {"$gt": 10}}, {"i": {"$nin": [11, 12]}}]}, {"tags": "cell"},
                {"year": {"$gt": self.rng.choice([-1e308, 1e308, 0])}}, {"i": self.rng.randrange(300)}]))
        if self.chance(0.6):
            return self.rng.choice(BAD_FILTERS)
        return self.rng.choice([lambda: json.dumps({self.text(8): 1}),
                                lambda: deep_filter(self.rng.choice([10, 33, 100, 400, 1000, 5000])),
                                lambda: deep_field_filter(self.rng.choice([10, 1000, 50_000])),
                                lambda: wide_filter(self.rng.choice([100, 257, 20_000])),
                                lambda: json.dumps({"i": {"$in": list(range(self.rng.choice([1000, 200_000])))}})])()

    def params(self) -> pb.SearchParams:
        params = pb.SearchParams(
            nprobe=self.uint([0, 0, 1, 8, 96, 65_536, 65_537]), rescore_candidates=self.uint([0, 0, 1, 40, 10_000]),
            mode=self.rng.choice(["", "", "dense", "lexical", "hybrid", "Dense", "bm25", self.text(6)]),
            fusion=self.rng.choice(["", "", "weighted", "rrf", "RRF", self.text(5)]),
            rrf_k=self.uint([0, 0, 1, 60, 1000]), with_vectors=self.chance(0.2), allow_partial=self.chance(0.1))
        if self.chance(0.3):
            params.alpha = self.rng.choice([0.0, 0.5, 1.0, -0.1, 1.5, math.nan, math.inf, -math.inf])
        return params

    def query_text(self) -> str:
        r = self.rng.random()
        if r < 0.02:
            return "heat " * (BIG_TEXT // 5)
        return self.rng.choice(self.corpus.texts)[:200] if r < 0.5 else self.text(60)

    # -- requests, one per method --
    def create(self) -> pb.CreateCollectionRequest:
        name = self.name() if self.chance(0.6) else self.rng.choice(self.scratch)
        no_encoder = self.chance(0.85)
        return pb.CreateCollectionRequest(
            name=name, no_encoder=no_encoder,
            encoder=self.rng.choice(["", "", "minilm", "no-such-model", "../../etc", "/etc", "/dev/zero", ".",
                                     self.text(10), "sentence-transformers/all-MiniLM-L6-v2"]),
            dim=self.uint([0, 1, 2, 8, DIM, 385, 4096, 100_000]),
            codec=self.rng.choice(["", "int8", "fp8", "fp16", "fp32", "pca2+fp8", "mrl8+int8", "pca999999+fp8", "int7",
                                   "mrl0", "+", "binary", self.text(10), "fp8" * 5000]),
            index=self.rng.choice(["", "flat", "spann", "auto", "SPANN", self.text(5)]), exist_ok=self.chance(0.5),
            shards=self.rng.choice([0] * 9 + [1, 3, 2**32 - 1]), replicas=self.rng.choice([0] * 9 + [2]))

    def upsert(self, collection: str | None = None) -> pb.UpsertRequest:
        name = collection or self.name()
        ids = self.ids()
        points = []
        for i in ids:
            point = pb.Point(id=i, metadata_json=self.metadata_json())
            if self.chance(0.7):
                r = self.rng.random()
                big = r > 0.995 and len(ids) < 10  # 10 MB texts, but not thousands of them in one message
                point.text = "heat " * (BIG_TEXT // 5) if big else self.text(80) if r > 0.6 else self.rng.choice(
                    self.corpus.texts)
            points.append(point)
        request = pb.UpsertRequest(collection=name, points=points)
        if (name != "enc" or self.chance(0.3)) and self.chance(0.85):
            request.vectors.CopyFrom(self.vectors(len(ids)))
        if self.chance(0.08):
            request.checkpoint_name = self.rng.choice(["job", "", "x" * 300, self.text(8)])
            request.checkpoint_json = self.rng.choice(['{"line": 3}', "[1]", "{", '{"a": NaN}', json.dumps(
                {"big": "x" * 70_000})])
        return request

    def delete(self) -> pb.DeleteRequest:
        ids = self.ids()
        ids = [i if not i.startswith(tuple("0123456789")) or self.chance(0.1) else f"fz-id-{i}" for i in ids]
        return pb.DeleteRequest(collection=self.name(), ids=ids)

    def get(self) -> pb.GetRequest:
        return pb.GetRequest(collection=self.name(), ids=self.ids())

    def search(self) -> pb.SearchRequest:
        request = pb.SearchRequest(collection=self.name(), k=self.uint([1, 5, 10, 10, 100, 10_000, 10_001]),
                                   filter_json=self.filter_json(), model=self.rng.choice(
                                       ["", "", "", "all-MiniLM-L6-v2", "other-model", self.text(5)]))
        r = self.rng.random()
        if r < 0.55:
            request.vector.CopyFrom(self.vectors(1 if self.chance(0.9) else self.rng.choice([0, 2])))
        elif r < 0.95:
            request.text = self.query_text()
            if self.chance(0.3):
                request.text_vector.CopyFrom(self.vectors(1))
        if self.chance(0.7):
            request.params.CopyFrom(self.params())
        return request

    def search_batch(self) -> pb.SearchBatchRequest:
        n = self.rng.choice([0, 1, 2, 5, 17, 40]) if not self.chance(0.02) else 5000
        request = pb.SearchBatchRequest(collection=self.name(), k=self.uint([1, 5, 10, 100, 10_001]),
                                        filter_json=self.filter_json(), model=self.rng.choice(["", "", "x"]))
        r = self.rng.random()
        if r < 0.4:
            request.vectors.CopyFrom(self.vectors(n))
        elif r < 0.9:
            request.texts.extend(self.query_text()[:300] for _ in range(n))
            if self.chance(0.4):
                request.vectors.CopyFrom(self.vectors(n if self.chance(0.8) else n + 1))
        if self.chance(0.7):
            request.params.CopyFrom(self.params())
        return request

    def structured(self) -> tuple[str, Method, list[Message]]:
        """(kind, method, requests) of one well-formed request with hostile values."""
        kind = self.rng.choices(
            ["create", "describe", "list", "drop", "upsert", "upsert_stream", "delete", "get", "count", "search",
             "search_batch", "stats", "health"], weights=[8, 3, 1, 4, 18, 4, 6, 5, 2, 25, 10, 1, 1])[0]
        m = METHODS
        if kind == "create":
            return kind, m["Create"], [self.create()]
        if kind == "describe":
            return kind, m["Describe"], [pb.DescribeCollectionRequest(name=self.name())]
        if kind == "list":
            return kind, m["List"], [pb.ListCollectionsRequest()]
        if kind == "drop":
            return kind, m["Drop"], [pb.DropCollectionRequest(name=self.droppable())]
        if kind == "upsert":
            return kind, m["Upsert"], [self.upsert()]
        if kind == "upsert_stream":
            name = self.name()
            return kind, m["UpsertStream"], [self.upsert(name if self.chance(0.8) else None)
                                             for _ in range(self.rng.choice([0, 1, 2, 3, 5]))]
        if kind == "delete":
            return kind, m["Delete"], [self.delete()]
        if kind == "get":
            return kind, m["Get"], [self.get()]
        if kind == "count":
            return kind, m["Count"], [pb.CountRequest(collection=self.name())]
        if kind == "search":
            return kind, m["Search"], [self.search()]
        if kind == "search_batch":
            return kind, m["SearchBatch"], [self.search_batch()]
        if kind == "stats":
            return kind, m["Stats"], [pb.StatsRequest()]
        return kind, m["HealthCheck"], [health_pb2.HealthCheckRequest(
            service=self.rng.choice(["", "nestvec.v1.Points", "nope", self.text(10)]))]

    def mutate(self, data: bytes) -> bytes:
        """Flip, cut, insert, duplicate or overwrite bytes of a valid encoding."""
        buf = bytearray(data)
        for _ in range(self.rng.randint(1, 4)):
            op = self.rng.randrange(5)
            at = self.rng.randrange(len(buf) + 1)
            if op == 0 and buf:
                buf[min(at, len(buf) - 1)] ^= 1 << self.rng.randrange(8)
            elif op == 1:
                del buf[at:]
            elif op == 2:
                buf[at:at] = self.rng.randbytes(self.rng.randint(1, 12))
            elif op == 3 and buf:
                end = min(len(buf), at + self.rng.randint(1, 64))
                buf[at:at] = buf[at:end] * self.rng.randint(1, 4)
            elif buf:
                buf[min(at, len(buf) - 1)] = self.rng.choice([0x00, 0x7F, 0x80, 0xFF])
        return bytes(buf)

    def case(self) -> Case:
        r = self.rng.random()
        kind, method, requests = self.structured()
        payloads = [q.SerializeToString() for q in requests]
        note = f"{method.name} {_describe(requests)}"
        if r < 0.1:
            method = self.rng.choice(list(METHODS.values()))
            payloads = [self.rng.randbytes(self.rng.choice([0, 1, 7, 64, 1000]))
                        for _ in range(self.rng.randint(1, 3) if method.stream else 1)]
            return Case("raw_bytes", method, payloads, f"{method.name} random bytes {[p.hex()[:40] for p in payloads]}")
        if r < 0.22:
            payloads = [self.mutate(p) for p in payloads] if payloads else [self.mutate(b"")]
            return Case("mutated", method, payloads, f"mutated {note}")
        if r < 0.26:
            return Case("no_key", method, payloads, f"no key: {note}", key=None if self.chance(0.5) else WRONG_KEY)
        return Case(kind, method, payloads, note)


def _describe(requests: list[Message]) -> str:
    """A short, readable summary of what was sent (long strings cut)."""
    parts = []
    for request in requests[:3]:
        fields = []
        for descriptor, value in request.ListFields():
            text = repr(value) if not isinstance(value, Message) else "{" + _describe([value])[1:-1] + "}"
            if not isinstance(value, str | bytes | Message) and hasattr(value, "__len__"):  # repeated
                text = f"[{len(value)} x {repr(value[0])[:60] if len(value) else ''}]"
            fields.append(f"{descriptor.name}={text[:80]}{'...' if len(text) > 80 else ''}")
        parts.append("(" + ", ".join(fields) + ")")
    return "[" + "; ".join(parts) + (f"; +{len(requests) - 3}" if len(requests) > 3 else "") + "]"


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def edge_cases(gen: Gen, corpus: Corpus) -> list[Case]:
    """The issue's list, every run: each hostile value once, at a collection where it matters."""
    m = METHODS
    vec = pb.Vectors(data=corpus.vectors[:1].astype("<f4").tobytes(), dim=DIM, count=1)
    out: list[Case] = []

    def add(kind: str, method: Method, request: Message | list[Message], note: str) -> None:
        requests = request if isinstance(request, list) else [request]
        out.append(Case(kind, method, [q.SerializeToString() for q in requests], note))

    def raw(kind: str, method: Method, payload: bytes, note: str) -> None:
        out.append(Case(kind, method, [payload], note))

    def bad_vector(values: np.ndarray) -> pb.Vectors:
        return pb.Vectors(data=values.astype("<f4").tobytes(), dim=values.shape[1], count=values.shape[0])

    for k in (0, 10_000, 10_001, 2**31, 2**32 - 1):
        add("search", m["Search"], pb.SearchRequest(collection="sci", vector=vec, k=k), f"k={k}")
    base = pb.SearchRequest(collection="sci", vector=vec).SerializeToString()
    raw("search", m["Search"], base + b"\x20" + varint(2**64 - 1), "k=-1 (a 64-bit varint into uint32)")
    raw("search", m["Search"], base + b"\x20" + varint(2**63), "k=-2**63 as a varint")
    for label, values in [("NaN", math.nan), ("inf", math.inf), ("-inf", -math.inf)]:
        v = corpus.vectors[:1].copy()
        v[0, 7] = values
        add("search", m["Search"], pb.SearchRequest(collection="sci", vector=bad_vector(v), k=5), f"{label} query")
        add("upsert", m["Upsert"], pb.UpsertRequest(collection="sci", points=[pb.Point(id="edge-nan")],
                                                    vectors=bad_vector(v)), f"{label} vector upsert")
    zero = np.zeros((1, DIM), np.float32)
    add("search", m["Search"], pb.SearchRequest(collection="sci", vector=bad_vector(zero), k=5), "zero query")
    for scale in (1e38, 1e-42):
        scaled = bad_vector(corpus.vectors[:1] * scale)
        add("upsert", m["Upsert"], pb.UpsertRequest(collection="sci", points=[pb.Point(id=f"edge-scale-{scale}")],
                                                    vectors=scaled), f"vector x {scale}")
        add("search", m["Search"], pb.SearchRequest(collection="sci", vector=scaled, k=5), f"query x {scale}")
    for dim in (DIM - 1, DIM + 1, 1):
        wrong = bad_vector(np.ones((1, dim), np.float32))
        add("search", m["Search"], pb.SearchRequest(collection="sci", vector=wrong, k=5), f"dim {dim} query")
        add("upsert", m["Upsert"], pb.UpsertRequest(collection="sci", points=[pb.Point(id="edge-dim")],
                                                    vectors=wrong), f"dim {dim} upsert")
    add("upsert", m["Upsert"], pb.UpsertRequest(collection="sci", points=[pb.Point(id="a"), pb.Point(id="b")],
                                                vectors=vec), "2 points, 1 vector")
    add("upsert", m["Upsert"], pb.UpsertRequest(collection="sci", points=[pb.Point(id="a")],
                                                vectors=pb.Vectors(data=vec.data, dim=2**32 - 1, count=0)),
        "dim 2**32-1 count 0")
    big = "heat " * (BIG_TEXT // 5)
    add("upsert", m["Upsert"], pb.UpsertRequest(collection="sci", points=[pb.Point(id="edge-big", text=big)],
                                                vectors=vec), "10 MB text with a vector")
    add("search", m["Search"], pb.SearchRequest(collection="sci", text=big, k=5, params=pb.SearchParams(
        mode="lexical")), "10 MB lexical query")
    add("search", m["Search"], pb.SearchRequest(collection="sci", text=big, k=5, params=pb.SearchParams(
        mode="hybrid"), text_vector=vec), "10 MB hybrid query")
    add("upsert", m["Upsert"], pb.UpsertRequest(collection="sci", points=[pb.Point(id="edge-empty", text="")],
                                                vectors=vec), "empty text")
    if gen.encoder:
        add("upsert", m["Upsert"], pb.UpsertRequest(collection="enc", points=[pb.Point(id="edge-big", text=big)]),
            "10 MB text to encode")
        add("search", m["Search"], pb.SearchRequest(collection="enc", text=big, k=5), "10 MB query to encode")
        add("search_batch", m["SearchBatch"], pb.SearchBatchRequest(collection="enc", texts=[big, "heat"], k=5),
            "10 MB query in a batch")
        add("upsert", m["Upsert"], pb.UpsertRequest(collection="enc", points=[pb.Point(id="edge-empty", text="")]),
            "empty text to encode")
        add("search", m["Search"], pb.SearchRequest(collection="enc", text="", k=5), "empty query to encode")
        add("upsert", m["Upsert"], pb.UpsertRequest(collection="enc", points=[pb.Point(id="edge-uni", text="".join(
            ODD) * 10)]), "unicode text to encode")
    add("upsert", m["Upsert"], pb.UpsertRequest(collection="sci", points=[pb.Point(id="edge-over", text="x" * (
        SERVER_LIMIT + 1000))], vectors=vec), "a message over the server's limit")
    for depth in (33, 100, 450, 490, 1000, 100_000):
        add("search", m["Search"], pb.SearchRequest(collection="sci", vector=vec, k=5, filter_json=deep_filter(depth)),
            f"filter $and nested {depth} deep")
    add("search", m["Search"], pb.SearchRequest(collection="sci", vector=vec, k=5,
                                                filter_json="[" * 100_000 + "]" * 100_000), "filter 100k [ deep")
    for width in (300, 50_000):
        add("search", m["Search"], pb.SearchRequest(collection="sci", vector=vec, k=5, filter_json=wide_filter(width)),
            f"filter $or of {width:,}")
    add("search", m["Search"], pb.SearchRequest(collection="sci", vector=vec, k=5, filter_json=json.dumps(
        {"i": {"$in": list(range(500_000))}})), "filter $in of 500,000")
    for depth in (1000, 100_000):
        add("upsert", m["Upsert"], pb.UpsertRequest(collection="sci", points=[pb.Point(
            id="edge-deep", metadata_json='{"a": ' * depth + "1" + "}" * depth)], vectors=vec),
            f"metadata nested {depth} deep")
    add("upsert", m["Upsert"], pb.UpsertRequest(collection="sci", points=[pb.Point(id="edge-nan-meta",
                                                                                   metadata_json='{"a": NaN}')],
                                                vectors=vec), "NaN in metadata")
    add("search", m["Search"], pb.SearchRequest(collection="sci", vector=vec, k=5, params=pb.SearchParams(
        rescore_candidates=2**32 - 1)), "rescore_candidates 2**32-1")
    add("search", m["Search"], pb.SearchRequest(collection="sci", vector=vec, k=10_000, params=pb.SearchParams(
        nprobe=2**32 - 1)), "nprobe 2**32-1")
    add("search", m["Search"], pb.SearchRequest(collection="sci", text="heat", k=5, params=pb.SearchParams(
        mode="hybrid", alpha=math.nan), text_vector=vec), "alpha NaN")
    add("search", m["Search"], pb.SearchRequest(collection="sci", text="heat", k=5, params=pb.SearchParams(
        mode="hybrid", fusion="rrf", rrf_k=2**32 - 1), text_vector=vec), "rrf_k 2**32-1")
    add("search_batch", m["SearchBatch"], pb.SearchBatchRequest(collection="sci", k=5), "empty batch")
    uni = "".join(ODD)
    add("upsert", m["Upsert"], pb.UpsertRequest(collection="sci", points=[pb.Point(
        id=uni[:60], text=uni * 3, metadata_json=json.dumps({uni: uni}))], vectors=vec), "unicode id, text, metadata")
    add("get", m["Get"], pb.GetRequest(collection="sci", ids=[uni[:60], "\x00", "x" * 257]), "unicode ids")
    add("get", m["Get"], pb.GetRequest(collection="sci", ids=[f"g{j}" for j in range(100_000)]), "100,000 ids")
    add("upsert", m["Upsert"], pb.UpsertRequest(collection="sci", points=[pb.Point(id=f"e{j}") for j in range(50_001)]),
        "50,001 points")
    for name in gen.nasty:
        add("create", m["Create"], pb.CreateCollectionRequest(name=name, no_encoder=True, dim=4), f"name {name[:40]!r}")
        add("upsert", m["Upsert"], pb.UpsertRequest(collection=name, points=[pb.Point(id="n")], vectors=pb.Vectors(
            data=np.ones(4, "<f4").tobytes(), dim=4, count=1)), f"upsert into {name[:40]!r}")
        add("drop", m["Drop"], pb.DropCollectionRequest(name=name), f"drop {name[:40]!r}")
        add("describe", m["Describe"], pb.DescribeCollectionRequest(name=name), f"describe {name[:40]!r}")
    for dim in (0, 2**32 - 1, 100_000_000):
        add("create", m["Create"], pb.CreateCollectionRequest(name="fz0", no_encoder=True, dim=dim), f"dim {dim}")
    add("create", m["Create"], pb.CreateCollectionRequest(name="fz1", no_encoder=True, dim=8, codec="pca999999+fp8"),
        "codec wider than dim")
    add("create", m["Create"], pb.CreateCollectionRequest(name="fz1", encoder="/etc"), "encoder from /etc")
    add("create", m["Create"], pb.CreateCollectionRequest(name="fz1", encoder="no-such-model"), "unknown model")
    add("create", m["Create"], pb.CreateCollectionRequest(name="fz2", no_encoder=True, dim=4, shards=3),
        "sharded without Ray")
    good = pb.UpsertRequest(collection="sci", points=[pb.Point(id="edge-stream-0")], vectors=vec)
    bad = pb.UpsertRequest(collection="sci", points=[pb.Point(id="edge-stream-1")],
                           vectors=bad_vector(np.ones((1, 3), np.float32)))
    add("upsert_stream", m["UpsertStream"], [good, bad, good], "stream: good, bad, good")
    add("upsert_stream", m["UpsertStream"], [], "empty stream")
    for method in METHODS.values():
        raw("raw_bytes", method, b"\xff\xff\xff\xff\x0f" + bytes(range(256)), f"{method.name} garbage")
        raw("raw_bytes", method, b"\x0a\xff\xff\xff\xff\x0f", f"{method.name} a 4 GB length prefix")
    return out


# -- sending --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    code: str
    details: str
    replies: list[bytes]
    seconds: float


class Sender:
    """Bytes in, bytes out, through grpc's generic multicallables (no client-side serializing)."""

    def __init__(self, channel: grpc.Channel, deadline_s: float) -> None:
        self.channel, self.deadline_s = channel, deadline_s
        self._calls: dict[str, Any] = {}

    def send(self, case: Case) -> Outcome:
        metadata = () if case.key is None else (("authorization", f"Bearer {case.key}"),)
        start = time.perf_counter()
        replies: list[bytes] = []
        try:
            if case.method.stream:
                call = self._calls.setdefault(case.method.path, self.channel.stream_stream(case.method.path))
                for reply in call(iter(case.payloads), timeout=self.deadline_s, metadata=metadata):
                    replies.append(reply)
            else:
                call = self._calls.setdefault(case.method.path, self.channel.unary_unary(case.method.path))
                replies.append(call(case.payloads[0], timeout=self.deadline_s, metadata=metadata))
            code, details = "OK", ""
        except grpc.RpcError as err:
            rpc: Any = err
            code, details = rpc.code().name, rpc.details() or ""
        return Outcome(code, details, replies, time.perf_counter() - start)


# -- the digest: everything a rejected request must leave as it was ---------------------------------
class Digest:
    """The data as the API shows it. A light digest (collections, Describe, a probe search each) is
    taken after every write; the rows a write names are read before and after it; a full one (Get of
    every id ever written: 10 MB texts included, so not after every write) every --check-every cases."""

    def __init__(self, channel: grpc.Channel, corpus: Corpus) -> None:
        self.collections = pb_grpc.CollectionsStub(channel)
        self.points = pb_grpc.PointsStub(channel)
        self.metadata = (("authorization", f"Bearer {API_KEY}"),)
        self.known: dict[str, set[str]] = {}
        self.probe = corpus.vectors[5:6]
        self.taken = 0

    def learn(self, request: pb.UpsertRequest) -> None:
        self.known.setdefault(request.collection, set()).update(p.id for p in request.points)

    def _try(self, call: Callable[..., Any], request: Message) -> Any:
        """The reply, or its status as a string (which a digest compares like any value)."""
        try:
            return call(request, metadata=self.metadata, timeout=60)
        except grpc.RpcError as err:
            rpc: Any = err
            return f"{rpc.code().name}: {rpc.details()}"

    def rows(self, collection: str, ids: list[str]) -> Any:
        """(id, found, text hash, metadata) per id, or the status a Get of them got."""
        got = self._try(self.points.Get, pb.GetRequest(collection=collection, ids=ids))
        return got if isinstance(got, str) else [
            (p.id, f, hashlib.sha1(p.text.encode()).hexdigest()[:12] if p.HasField("text") else None, p.metadata_json)
            for p, f in zip(got.points, got.found, strict=True)]

    def take(self, full: bool = False) -> JSONLike:
        self.taken += 1
        listed = self._try(self.collections.List, pb.ListCollectionsRequest())
        names = listed if isinstance(listed, str) else list(listed.names)
        out: JSONLike = {"names": names}
        for name in names if isinstance(names, list) else []:
            info = self._try(self.collections.Describe, pb.DescribeCollectionRequest(name=name))
            if isinstance(info, str):
                out[name] = info
                continue
            details = json.loads(info.info_json)
            details.pop("disk_bytes", None)
            probe = np.resize(self.probe, (1, info.dim)) if info.dim else self.probe
            found = self._try(self.points.Search, pb.SearchRequest(collection=name, k=10, vector=pb.Vectors(
                data=probe.astype("<f4").tobytes(), dim=probe.shape[1], count=1)))
            hits = found if isinstance(found, str) else [(h.id, round(h.score, 4)) for h in found.hits]
            out[name] = {"count": info.count, "info": details, "search": hits}
            if full:
                out[name]["points"] = self.rows(name, sorted(self.known.get(name, ())))
        return out


def named_rows(case: Case) -> dict[str, list[str]]:
    """The ids per collection that a write names (nothing for bytes that do not parse)."""
    out: dict[str, list[str]] = {}
    if case.method.name not in ("Upsert", "UpsertStream", "Delete"):
        return out
    for payload in case.payloads:
        try:
            request: Any = case.method.request.FromString(payload)
        except DecodeError:
            continue
        ids = [p.id for p in request.points] if case.method.name != "Delete" else list(request.ids)
        out.setdefault(request.collection, []).extend(ids)
    return {name: list(dict.fromkeys(ids))[:20_000] for name, ids in out.items()}


def difference(before: JSONLike, after: JSONLike) -> str:
    """What changed, briefly (empty when nothing did)."""
    if before == after:
        return ""
    if before.get("names") != after.get("names"):
        return f"collections {before.get('names')} -> {after.get('names')}"
    for name, was in before.items():
        now = after.get(name)
        if was != now:
            if isinstance(was, dict) and isinstance(now, dict):
                keys = [k for k in was if was[k] != now.get(k)]
                return f"{name}: {', '.join(keys)} changed: {str({k: was[k] for k in keys})[:300]} -> " \
                       f"{str({k: now.get(k) for k in keys})[:300]}"
            return f"{name}: {str(was)[:200]} -> {str(now)[:200]}"
    return "changed"


def tree(root: Path, skip: Path) -> set[str]:
    """Every path under root except those under skip."""
    out = set()
    for path in root.rglob("*"):
        if path != skip and skip not in path.parents:
            out.add(str(path.relative_to(root)))
    return out


# -- the run --------------------------------------------------------------------------------------
@dataclass
class Tally:
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    bugs: list[JSONLike] = field(default_factory=list)
    slowest: list[tuple[float, str]] = field(default_factory=list)
    rejected_writes: int = 0
    accepted_writes: int = 0
    hangs: int = 0

    def count(self, kind: str, code: str) -> None:
        self.by_kind.setdefault(kind, Counter())[code] += 1

    def bug(self, i: int, case: Case, problem: str, outcome: Outcome | None = None) -> None:
        self.bugs.append({"case": i, "kind": case.kind, "method": case.method.name, "problem": problem,
                          "code": outcome.code if outcome else None,
                          "details": (outcome.details[:300] if outcome else ""), "request": case.note[:400]})


def seed_data(channel: grpc.Channel, corpus: Corpus, encoder: bool) -> None:
    """The protected collections, through the same API (typed stubs)."""
    md = (("authorization", f"Bearer {API_KEY}"),)
    collections, points = pb_grpc.CollectionsStub(channel), pb_grpc.PointsStub(channel)
    docs = [pb.Point(id=i, text=t, metadata_json=json.dumps(m))
            for i, t, m in zip(corpus.ids, corpus.texts, corpus.metadata, strict=True)]
    collections.Create(pb.CreateCollectionRequest(name="sci", no_encoder=True, dim=DIM), metadata=md, timeout=60)
    vectors = pb.Vectors(data=corpus.vectors.astype("<f4").tobytes(), dim=DIM, count=len(corpus.ids))
    points.Upsert(pb.UpsertRequest(collection="sci", points=docs, vectors=vectors), metadata=md, timeout=60)
    if encoder:
        collections.Create(pb.CreateCollectionRequest(name="enc"), metadata=md, timeout=300)
        points.Upsert(pb.UpsertRequest(collection="enc", points=docs[:ENCODED_DOCS]), metadata=md, timeout=120)


def cases(args: argparse.Namespace, gen_for: Callable[[int], Gen], corpus: Corpus) -> Iterator[tuple[int, Case]]:
    """Edge cases (numbered -1, -2, ...), then random case i from its own seeded generator."""
    if args.only is None:
        for j, case in enumerate(edge_cases(gen_for(-1), corpus) if args.edges else []):
            yield -(j + 1), case
    for i in [args.only] if args.only is not None else range(args.cases):
        yield i, gen_for(i).case()


class Fuzzer:
    """Sends each case, then holds the server to its promises; what breaks one is a bug in the tally."""

    def __init__(self, server: ServerProcess, channel: grpc.Channel, corpus: Corpus, args: argparse.Namespace,
                 log: IO[str] | None) -> None:
        self.server, self.args, self.log = server, args, log
        self.sender = Sender(channel, args.deadline_s)
        self.digest = Digest(channel, corpus)
        self.digest.known["sci"] = set(corpus.ids)
        if args.encoder:
            self.digest.known["enc"] = set(corpus.ids[:ENCODED_DOCS])
        self.baseline, self.full_baseline = self.digest.take(), self.digest.take(full=True)
        self.tally = Tally()
        self.crashed = False
        self.sent = 0

    def step(self, i: int, case: Case) -> bool:
        """One case; False when the run must stop (the server died, or kept hanging)."""
        named = named_rows(case) if case.write else {}
        before = {name: self.digest.rows(name, ids) for name, ids in named.items()}
        outcome = self.sender.send(case)
        self.sent += 1
        tally = self.tally
        tally.count(case.kind, outcome.code)
        tally.slowest = sorted([*tally.slowest, (outcome.seconds, f"{i}: {case.note[:100]}")], reverse=True)[:5]
        if self.log:
            self.log.write(json.dumps({"case": i, "kind": case.kind, "code": outcome.code,
                                       "details": outcome.details[:200], "ms": round(outcome.seconds * 1000, 1),
                                       "request": case.note[:300]}) + "\n")
        if not self.server.alive():
            self.crashed = True
            tally.bug(i, case, f"server exited with {self.server.proc.returncode if self.server.proc else None}",
                      outcome)
            return False
        if outcome.code == "DEADLINE_EXCEEDED":
            tally.hangs += 1
            tally.bug(i, case, f"no reply within {self.args.deadline_s} s (hang)", outcome)
            return tally.hangs < 3
        if "metadata size exceeds" in outcome.details:  # the client refused the reply's headers
            tally.bug(i, case, f"error message too long for the status header: {outcome.code}", outcome)
        elif outcome.code not in case.expected():
            tally.bug(i, case, f"unexpected status {outcome.code}", outcome)
        elif case.payloads and not _parses(case.method, case.payloads[0]) and PARSE_FAILURE not in outcome.details \
                and outcome.code not in ("RESOURCE_EXHAUSTED", "UNAUTHENTICATED"):
            tally.bug(i, case, f"unparseable bytes answered without naming the message: {outcome.code}", outcome)
        elif outcome.code == "OK" and (problem := check_reply(case, outcome)):
            tally.bug(i, case, problem, outcome)
        if case.write and outcome.code == "OK":
            tally.accepted_writes += 1
            learn(self.digest, case)
            self.refresh(case)
        elif case.write:
            tally.rejected_writes += 1
            if case.method.stream and outcome.replies:  # the batches before the refused one are committed
                if problem := check_partial_stream(self.digest, case, outcome):
                    tally.bug(i, case, problem, outcome)
                self.refresh(case)
            else:
                self.compare(i, case, outcome, "a rejected write changed the data")
                after = {name: self.digest.rows(name, ids) for name, ids in named.items()}
                if after != before:
                    changed = [name for name in before if before[name] != after[name]]
                    tally.bug(i, case, f"a rejected write changed the rows it named in {changed}", outcome)
        if self.sent % self.args.check_every == 0:
            self.compare(i, case, outcome, "the data changed", full=True)
        return True

    def compare(self, i: int, case: Case | None, outcome: Outcome | None, what: str, full: bool = False) -> None:
        """The data against the baseline; a full look also becomes the full baseline."""
        now = self.digest.take(full)
        was = self.full_baseline if full else self.baseline
        if change := difference(was, now):
            if case is None:
                self.tally.bugs.append({"case": "end", "problem": f"{what}: {change}"})
            else:
                self.tally.bug(i, case, f"{what}: {change}", outcome)
        if full:
            self.full_baseline = now
            self.baseline = self.digest.take()

    def refresh(self, case: Case) -> None:
        """New baselines after an accepted write: the full one re-reads only the collections it touched."""
        light = self.digest.take()
        old = self.full_baseline
        names = light["names"] if isinstance(light["names"], list) else []
        touched = set(named_rows(case)) | (set(names) ^ set(old["names"] if isinstance(old["names"], list) else []))
        full: JSONLike = {"names": light["names"]}
        for name in names:
            entry = light[name]
            if isinstance(entry, dict):
                previous = old.get(name)
                entry = {**entry, "points": previous["points"] if name not in touched and isinstance(previous, dict)
                         else self.digest.rows(name, sorted(self.digest.known.get(name, ())))}
            full[name] = entry
        self.baseline, self.full_baseline = light, full


def stacks(log: str) -> str:
    """The thread stacks faulthandler wrote when the server was sent SIGABRT (see ServerProcess.stop)."""
    start = log.rfind("Fatal Python error")
    return log[start:log.find("Extension modules", start)][:6000] if start >= 0 else log[-2000:]


def server_errors(log: str) -> list[str]:
    """The distinct exception lines the server logged (gRPC logs each request it could not parse)."""
    lines = [line.strip() for line in log.splitlines() if re.match(r"^\w+(\.\w+)*(Error|Exception): ", line.strip())]
    return [f"{n} x {line[:160]}" for line, n in Counter(lines).most_common(10)]


def run(args: argparse.Namespace) -> JSONLike:
    started = time.perf_counter()
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    print(f"fuzz: seed {seed} (replay: --seed {seed} --cases {args.cases}; one case: --only I)", flush=True)
    corpus = Corpus.load(SEEDED_DOCS)
    escape = f"escape-{seed}"
    with tempfile.TemporaryDirectory(prefix="nestvec-fuzz-") as tmp, \
            (open(args.log, "w", encoding="utf-8") if args.log else contextlib.nullcontext()) as log:
        root = Path(tmp)
        data, cwd = root / "data", root / "cwd"  # the server's working folder: relative writes land there
        cwd.mkdir()
        server = ServerProcess(data, root / "server.log", api_keys=[API_KEY], cwd=cwd)
        server.start()
        try:
            server.wait_ready()
            with server.channel() as channel:
                seed_data(channel, corpus, args.encoder)
                outside_before = tree(root, data)
                fuzzer = Fuzzer(server, channel, corpus, args, log)
                setup_s = time.perf_counter() - started

                def gen_for(i: int) -> Gen:
                    return Gen(random.Random(f"{seed}:{i}"), corpus, escape, root, args.encoder)

                for i, case in cases(args, gen_for, corpus):
                    if not fuzzer.step(i, case):
                        break
                if not fuzzer.crashed:
                    fuzzer.compare(0, None, None, "the data changed by the end", full=True)
            escaped = sorted(tree(root, data) - outside_before)
            escaped += [str(p) for p in (root.parent / escape, Path("/") / escape) if p.exists()]
            leftovers = sorted(p.name for p in data.iterdir() if p.name.startswith("."))
        finally:
            alive_at_end = server.alive()
            stopping = time.perf_counter()
            exit_code = server.stop()
            stop_s = time.perf_counter() - stopping
        log_text = server.log_text()
        errors = server_errors(log_text)
    tally = fuzzer.tally
    if escaped:
        tally.bugs.append({"case": "end", "problem": f"files appeared outside the data folder: {escaped[:10]}"})
    if leftovers:
        tally.bugs.append({"case": "end", "problem": f"half-made or half-dropped folders left: {leftovers[:10]}"})
    if not alive_at_end and not fuzzer.crashed:
        tally.bugs.append({"case": "end", "problem": f"the server was gone at the end (exit {exit_code})"})
    elif exit_code != 0 and not fuzzer.crashed:
        tally.bugs.append({"case": "end", "problem": f"SIGTERM did not stop the server cleanly (exit {exit_code} "
                                                    f"after {stop_s:.0f} s)", "stacks": stacks(log_text)})
    codes: Counter[str] = Counter()
    for counter in tally.by_kind.values():
        codes.update(counter)
    return {
        "passed": not tally.bugs,
        "seed": seed, "cases": int(sum(codes.values())), "random_cases": 0 if args.only is not None else args.cases,
        "codes": dict(codes.most_common()),
        "by_kind": {k: dict(v.most_common()) for k, v in sorted(tally.by_kind.items())},
        "bugs": tally.bugs[:50], "bug_count": len(tally.bugs), "crashed": fuzzer.crashed, "hangs": tally.hangs,
        "server_exit": exit_code, "rejected_writes_checked": tally.rejected_writes,
        "accepted_writes": tally.accepted_writes, "digests": fuzzer.digest.taken, "files_outside_data": escaped,
        "server_errors": errors, "slowest": [{"seconds": round(s, 2), "case": n} for s, n in tally.slowest],
        "setup_seconds": round(setup_s, 1), "stop_seconds": round(stop_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def learn(digest: Digest, case: Case) -> None:
    """Ids an accepted write may have written, so later digests read them back."""
    if case.method.name in ("Upsert", "UpsertStream"):
        for payload in case.payloads:
            digest.learn(pb.UpsertRequest.FromString(payload))


def check_partial_stream(digest: Digest, case: Case, outcome: Outcome) -> str:
    """A stream refused at batch b: batches before b are in, batch b's new ids are not."""
    acked = len(outcome.replies)
    requests = [pb.UpsertRequest.FromString(p) for p in case.payloads[:acked + 1]]
    for request in requests[:acked]:
        digest.learn(request)
    if acked >= len(requests):
        return ""
    failed = requests[acked]
    fresh = {p.id for p in failed.points} - digest.known.get(failed.collection, set())
    if not fresh:
        return ""
    try:
        got = digest.points.Get(pb.GetRequest(collection=failed.collection, ids=sorted(fresh)),
                                metadata=digest.metadata, timeout=60)
    except grpc.RpcError:
        return ""  # a refused Get (bad ids, no such collection): nothing of that batch can be there
    written = [p.id for p, f in zip(got.points, got.found, strict=True) if f]
    return f"refused batch {acked} was written: {written[:5]}" if written else ""


def check_reply(case: Case, outcome: Outcome) -> str:
    """An accepted request's reply parses and makes sense (hits at most k, finite scores)."""
    try:
        replies = [case.method.response.FromString(r) for r in outcome.replies]
    except DecodeError as err:
        return f"reply does not parse: {err}"
    if case.method.name in ("Search", "SearchBatch"):
        request: Any = case.method.request.FromString(case.payloads[0])
        first: Any = replies[0]
        results = first.results if case.method.name == "SearchBatch" else [first]
        for result in results:
            if len(result.hits) > request.k:
                return f"{len(result.hits)} hits for k={request.k}"
            if not all(math.isfinite(h.score) for h in result.hits):
                return "a hit with a score that is not finite"
            if len({h.id for h in result.hits}) != len(result.hits):
                return "the same id twice in one result"
    return ""


def plot(result: JSONLike, ax: Any) -> None:
    """Cases per request kind, stacked by the status code they got."""
    kinds = sorted(result["by_kind"], key=lambda k: sum(result["by_kind"][k].values()))
    codes = list(result["codes"])
    colors = {"OK": "#4c9a4c", "INVALID_ARGUMENT": "#e0a030", "NOT_FOUND": "#7f7fbf", "ALREADY_EXISTS": "#bf7fbf",
              "FAILED_PRECONDITION": "#bf9f6f", "RESOURCE_EXHAUSTED": "#6fb0bf", "UNAUTHENTICATED": "#9f9f9f",
              "INTERNAL": "#505050", "OUT_OF_RANGE": "#d0d070"}
    left = np.zeros(len(kinds))
    for code in codes:
        widths = np.array([result["by_kind"][k].get(code, 0) for k in kinds], dtype=float)
        ax.barh(kinds, widths, left=left, label=code, color=colors.get(code, "#d04040"))
        left += widths
    ax.set_xlabel(f"cases (seed {result['seed']}, {result['cases']} in all, {result['bug_count']} bugs)")
    ax.legend(fontsize=6, loc="lower right")
    ax.tick_params(axis="y", labelsize=7)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=5000, help="random cases after the fixed edge cases")
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh one (printed)")
    parser.add_argument("--only", type=int, default=None, help="replay just random case ONLY of --seed")
    parser.add_argument("--edges", action=argparse.BooleanOptionalAction, default=True,
                        help="run the fixed edge cases first")
    parser.add_argument("--encoder", action=argparse.BooleanOptionalAction, default=True,
                        help="also a collection with the bundled encoder (text cases)")
    parser.add_argument("--deadline-s", type=float, default=10.0, help="a request not answered by then is a hang")
    parser.add_argument("--check-every", type=int, default=50, help="digest the data every N cases (reads)")
    parser.add_argument("--log", default=None, help="one JSON line per case (code, details, ms, request)")
