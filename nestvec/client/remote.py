"""Remote client over gRPC: the same API and the same error classes as the embedded client."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, Unpack
from urllib.parse import urlparse

import grpc
import numpy as np

from nestvec import errors
from nestvec.client.base import ClientBase
from nestvec.errors import NestvecError, invalid
from nestvec.types import Hit, Hits, JSONDict, Record, SearchOptions, UpsertBatch
from nestvec.wire import convert
from nestvec.wire._pb.nestvec.v1 import nestvec_pb2 as pb
from nestvec.wire._pb.nestvec.v1 import nestvec_pb2_grpc as pb_grpc

ERROR_CLASS_KEY = "nestvec-error"
DEFAULT_MESSAGE_BYTES = 64 << 20
T = TypeVar("T")

# Every error class owns its status name; map a bare status back to its class.
_BY_STATUS: dict[grpc.StatusCode, type[NestvecError]] = {
    getattr(grpc.StatusCode, cls.grpc_status): cls
    for cls in (errors.InvalidArgumentError, errors.NotFoundError, errors.AlreadyExistsError,
                errors.FailedPreconditionError, errors.ResourceExhaustedError, errors.UnauthenticatedError,
                errors.PermissionDeniedError, errors.UnavailableError)
}


def error_from_rpc(err: grpc.RpcError) -> Exception:
    """The nestvec error class the server raised (named in trailing metadata), else one by status."""
    call: Any = err
    name = dict(call.trailing_metadata() or ()).get(ERROR_CLASS_KEY)
    cls = getattr(errors, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, NestvecError)):
        cls = _BY_STATUS.get(call.code())
    if cls is None:
        return err
    message = call.details() or call.code().name
    field = message.split(":", 1)[0] if cls is errors.InvalidArgumentError and ":" in message else None
    return cls(message, field=field)


class RemoteCollection:
    """A collection on a server; methods mirror nestvec.collection.Collection."""

    def __init__(self, client: RemoteClient, name: str, dim: int) -> None:
        self._client, self._name, self.dim = client, name, dim

    @property
    def name(self) -> str:
        return self._name

    def upsert(self, ids: Sequence[str | int], texts: Sequence[str | None] | None = None, vectors: Any = None,
               metadata: Sequence[JSONDict | None] | None = None, *,
               checkpoint: tuple[str, JSONDict] | None = None) -> int:
        """Sent as one batch, or as several (each its own transaction) when it would exceed the message
        limit; a checkpoint rides with the last of them, so it is saved only once every part is in."""
        requests = list(self._requests(ids, texts, vectors, metadata, checkpoint))
        if len(requests) == 1:
            return int(self._client._call(self._client.points.Upsert, requests[0]).written)
        return sum(int(ack.written) for ack in self._client._stream(self._client.points.UpsertStream, requests))

    def _requests(self, ids: Sequence[str | int], texts: Sequence[str | None] | None, vectors: Any,
                  metadata: Sequence[JSONDict | None] | None,
                  checkpoint: tuple[str, JSONDict] | None) -> list[pb.UpsertRequest]:
        """One batch as the requests that carry it (several past the message limit)."""
        n = len(ids)
        if texts is not None and len(texts) != n:
            raise invalid("texts", f"must be a list with one entry per id ({n})")
        if metadata is not None and len(metadata) != n:
            raise invalid("metadata", f"has {len(metadata)} entries for {n} ids")
        matrix = None if vectors is None else np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if matrix is not None and len(matrix) != n:
            raise invalid("vectors", f"has {len(matrix)} rows for {n} ids")
        requests = list(self._batches(ids, texts, matrix, metadata))
        if checkpoint is not None:  # the server checks the name and the state
            try:
                name, state = checkpoint
                requests[-1].checkpoint_name, requests[-1].checkpoint_json = str(name), json.dumps(state)
            except (TypeError, ValueError) as err:
                raise invalid("checkpoint", f"must be a (job name, JSON object) pair: {err}") from None
        return requests

    def upsert_stream(self, batches: Iterable[UpsertBatch]) -> Iterator[int]:
        """All batches over one UpsertStream call, each committed in its own transaction (with its
        checkpoint) and acknowledged: yields how many each wrote as the server commits it. The
        server indexes what is buffered once the stream ends."""

        def requests() -> Iterator[pb.UpsertRequest]:
            for batch in batches:
                parts = list(self._requests(batch.ids, batch.texts, batch.vectors, batch.metadata, batch.checkpoint))
                if len(parts) > 1:
                    raise invalid("batch", f"{len(batch.ids)} points exceed one message; send smaller batches")
                yield parts[0]

        try:
            for ack in self._client.points.UpsertStream(requests(), metadata=self._client.metadata):
                yield int(ack.written)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def _batches(self, ids: Sequence[str | int], texts: Sequence[str | None] | None, matrix: np.ndarray | None,
                 metadata: Sequence[JSONDict | None] | None) -> Iterator[pb.UpsertRequest]:
        limit = self._client.max_message_bytes // 2
        start = 0
        while start < len(ids) or start == 0:
            request, size = pb.UpsertRequest(collection=self._name), 0
            end = start
            while end < len(ids) and (size < limit or end == start):
                text = texts[end] if texts is not None else None
                meta = metadata[end] if metadata is not None else None
                point = convert.to_pb_point(Record(str(ids[end]), text, meta or {}))
                size += point.ByteSize() + (matrix.shape[1] * 4 if matrix is not None else 0)
                request.points.append(point)
                end += 1
            if matrix is not None:
                request.vectors.CopyFrom(convert.to_pb_vectors(matrix[start:end]))
            yield request
            if end == start:
                return
            start = end

    def delete(self, ids: Sequence[str | int]) -> int:
        request = pb.DeleteRequest(collection=self._name, ids=[str(i) for i in ids])
        return int(self._client._call(self._client.points.Delete, request).deleted)

    def get(self, ids: Sequence[str | int]) -> list[Record | None]:
        reply = self._client._call(self._client.points.Get, pb.GetRequest(collection=self._name,
                                                                          ids=[str(i) for i in ids]))
        return [convert.from_pb_point(p) if found else None for p, found in zip(reply.points, reply.found, strict=True)]

    def count(self) -> int:
        return int(self._client._call(self._client.points.Count, pb.CountRequest(collection=self._name)).count)

    def search(self, query: str | Sequence[float] | np.ndarray, k: int = 10, filter: JSONDict | None = None, *,
               vector: Sequence[float] | np.ndarray | None = None, **options: Unpack[SearchOptions]) -> list[Hit]:
        request = pb.SearchRequest(collection=self._name, k=self._check_k(k), filter_json=_filter_json(filter),
                                   model=options.get("model") or "", params=convert.to_pb_params(options))
        if isinstance(query, str):
            request.text = query
        else:
            request.vector.CopyFrom(convert.to_pb_vectors(np.asarray(query, dtype=np.float32)[None, :]))
        if vector is not None:
            request.text_vector.CopyFrom(convert.to_pb_vectors(np.asarray(vector, dtype=np.float32)[None, :]))
        reply = self._client._call(self._client.points.Search, request)
        return Hits([convert.from_pb_hit(h) for h in reply.hits], tuple(reply.missing_shards))

    def search_batch(self, queries: Sequence[str] | np.ndarray, k: int = 10, filter: JSONDict | None = None, *,
                     vectors: np.ndarray | Sequence[Sequence[float]] | None = None,
                     **options: Unpack[SearchOptions]) -> list[list[Hit]]:
        request = pb.SearchBatchRequest(collection=self._name, k=self._check_k(k), filter_json=_filter_json(filter),
                                        model=options.get("model") or "", params=convert.to_pb_params(options))
        if len(queries) and all(isinstance(q, str) for q in queries):
            request.texts.extend([str(q) for q in queries])
        elif len(queries):
            request.vectors.CopyFrom(convert.to_pb_vectors(queries))
        if vectors is not None:
            if not request.texts:
                raise invalid("vectors", "go with query texts (their dense side); give vectors as the queries instead")
            request.vectors.CopyFrom(convert.to_pb_vectors(vectors))
        reply = self._client._call(self._client.points.SearchBatch, request)
        return Hits([[convert.from_pb_hit(h) for h in result.hits] for result in reply.results],
                    tuple(reply.missing_shards))

    @staticmethod
    def _check_k(k: int) -> int:
        # proto fields are unsigned: catch what cannot be sent; the server checks the range.
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise invalid("k", f"must be an integer between 1 and 10000, got {k!r}")
        return int(min(k, 2**32 - 1))

    def info(self) -> JSONDict:
        return self._client.describe(self._name)

    def jobs(self) -> dict[str, JSONDict]:
        jobs: dict[str, JSONDict] = self.info().get("jobs", {})
        return jobs


def _filter_json(flt: JSONDict | None) -> str:
    if flt is None:
        return ""
    if not isinstance(flt, dict):
        raise invalid("filter", f"must be a JSON object, got {type(flt).__name__}")
    return convert.to_json(flt) or "{}"


class RemoteClient(ClientBase):
    """`nestvec.connect("grpc://host:port", api_key=...)`; grpcs:// for TLS."""

    def __init__(self, url: str, *, api_key: str | None = None, root_certificates: bytes | Path | None = None,
                 timeout_s: float = 60.0, retries: int = 4, max_message_bytes: int = DEFAULT_MESSAGE_BYTES) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("grpc", "grpcs") or not parsed.hostname or not parsed.port:
            raise invalid("url", f"expected grpc://host:port or grpcs://host:port, got {url!r}")
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        target = f"{parsed.hostname}:{parsed.port}"
        if parsed.scheme == "grpcs":
            certs = root_certificates.read_bytes() if isinstance(root_certificates, Path) else root_certificates
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(certs), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s, self.retries, self.max_message_bytes = timeout_s, retries, max_message_bytes
        self.collections = pb_grpc.CollectionsStub(self.channel)
        self.points = pb_grpc.PointsStub(self.channel)
        self.diagnostics = pb_grpc.DiagnosticsStub(self.channel)

    def _call(self, method: Callable[..., T], request: Any) -> T:
        """One RPC; UNAVAILABLE is retried with jittered exponential backoff (the request never ran)."""
        for attempt in range(self.retries + 1):
            try:
                return method(request, metadata=self.metadata, timeout=self.timeout_s)
            except grpc.RpcError as err:
                call: Any = err
                if call.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
                    continue
                raise error_from_rpc(err) from None
        raise AssertionError("unreachable")

    def _stream(self, method: Callable[..., Iterator[T]], requests: Sequence[Any]) -> list[T]:
        try:
            # No overall deadline: a bulk stream runs as long as its data takes (keepalives catch a dead peer).
            return list(method(iter(requests), metadata=self.metadata))
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def create_collection(self, name: str, *, encoder: str | None = "", dim: int | None = None,
                          codec: str = "", index: str = "auto", exist_ok: bool = False, shards: int | None = None,
                          replicas: int | None = None) -> RemoteCollection:
        if encoder is not None and not isinstance(encoder, str):
            raise invalid("encoder", "a remote server encodes with a model it has: pass its name or None")
        if shards is not None or replicas is not None:  # checked here: 0 means "not sharded" on the wire
            from nestvec.cluster.distributed import check_layout

            shards, replicas = check_layout(1 if shards is None else shards, 1 if replicas is None else replicas)
        info = self._call(self.collections.Create, pb.CreateCollectionRequest(
            name=name, encoder=encoder or "", no_encoder=encoder is None, dim=dim or 0, codec=codec,
            index=index, exist_ok=exist_ok, shards=shards or 0, replicas=replicas or 0))
        return RemoteCollection(self, info.name, info.dim)

    def get_collection(self, name: str) -> RemoteCollection:
        info = self._call(self.collections.Describe, pb.DescribeCollectionRequest(name=name))
        return RemoteCollection(self, info.name, info.dim)

    def describe(self, name: str) -> JSONDict:
        info = self._call(self.collections.Describe, pb.DescribeCollectionRequest(name=name))
        return dict(convert.from_json_object(info.info_json, "info_json"))

    def list_collections(self) -> list[str]:
        return list(self._call(self.collections.List, pb.ListCollectionsRequest()).names)

    def drop_collection(self, name: str) -> None:
        self._call(self.collections.Drop, pb.DropCollectionRequest(name=name))

    def stats(self) -> list[dict[str, Any]]:
        reply = self._call(self.diagnostics.Stats, pb.StatsRequest())
        return [{"method": m.method, "calls": m.calls, "errors": m.errors, "p50_ms": m.p50_ms, "p90_ms": m.p90_ms,
                 "p99_ms": m.p99_ms} for m in reply.methods]

    def close(self) -> None:
        self.channel.close()
