"""gRPC servicers: proto -> Catalog / Collection -> proto, with NestvecError -> status codes."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nestvec.catalog import DEFAULT_CODEC, AnyCollection, Catalog
from nestvec.checks import check_nprobe
from nestvec.encoders import BUNDLED_MODEL
from nestvec.errors import NestvecError, ResourceExhaustedError, invalid
from nestvec.index.fusion import check_fusion
from nestvec.service.coalesce import SearchCoalescer, check_search_threads
from nestvec.service.interceptors import AuthInterceptor, MethodStats, ParseInterceptor, StatsInterceptor
from nestvec.types import Hit
from nestvec.wire import convert
from nestvec.wire._pb.nestvec.v1 import nestvec_pb2 as pb
from nestvec.wire._pb.nestvec.v1 import nestvec_pb2_grpc as pb_grpc

log = logging.getLogger("nestvec.service")
ERROR_CLASS_KEY = "nestvec-error"
MAX_MESSAGE_BYTES = 64 << 20
MAX_BATCH_POINTS = 50_000
MAX_DETAILS = 1000  # characters of an error message sent back (gRPC clients take 8 KB of headers)
F = TypeVar("F", bound=Callable[..., Any])


def _details(message: str) -> str:
    """An error message short enough for the status header: messages quote the input, and a 100 KB
    collection name made a 100 KB header that the client refused (RESOURCE_EXHAUSTED, not the error)."""
    if len(message) <= MAX_DETAILS:
        return message
    return f"{message[:MAX_DETAILS]}... ({len(message) - MAX_DETAILS:,} characters cut)"


def _abort(context: grpc.ServicerContext, err: NestvecError) -> None:
    context.set_trailing_metadata(((ERROR_CLASS_KEY, type(err).__name__),))
    context.abort(getattr(grpc.StatusCode, err.grpc_status, grpc.StatusCode.UNKNOWN), _details(err.message))


def rpc(method: F) -> F:
    """Map nestvec errors to their status (with the class name in trailing metadata); others to INTERNAL."""

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except NestvecError as err:
            _abort(context, err)
        except Exception as err:  # an unexpected failure must still answer, not hang the client
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, _details(f"{type(err).__name__}: {err}"))

    return unary  # type: ignore[return-value]


def _k(value: int) -> int:
    if value == 0:
        raise invalid("k", "must be between 1 and 10000, got 0 (k is required)")
    return value


class CollectionsService(pb_grpc.CollectionsServicer):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    @staticmethod
    def info(collection: AnyCollection) -> pb.CollectionInfo:
        info = collection.info()
        enc = collection.config.encoder
        return pb.CollectionInfo(name=collection.name, count=int(info["count"]), dim=collection.config.dim,
                                 codec=collection.codec.spec, encoder_model=enc.model if enc else "",
                                 info_json=json.dumps(info))

    @rpc
    def Create(self, request: pb.CreateCollectionRequest, context: grpc.ServicerContext) -> pb.CollectionInfo:
        encoder = None if request.no_encoder else (request.encoder or BUNDLED_MODEL)
        sharded = request.shards or request.replicas
        collection = self.catalog.create_collection(
            request.name, encoder=encoder, dim=request.dim or None, codec=request.codec or DEFAULT_CODEC,
            index=request.index or "auto", exist_ok=request.exist_ok,
            shards=(request.shards or 1) if sharded else None, replicas=(request.replicas or 1) if sharded else None)
        return self.info(collection)

    @rpc
    def Describe(self, request: pb.DescribeCollectionRequest, context: grpc.ServicerContext) -> pb.CollectionInfo:
        return self.info(self.catalog.get_collection(request.name))

    @rpc
    def List(self, request: pb.ListCollectionsRequest,
             context: grpc.ServicerContext) -> pb.ListCollectionsResponse:
        return pb.ListCollectionsResponse(names=self.catalog.list_collections())

    @rpc
    def Drop(self, request: pb.DropCollectionRequest, context: grpc.ServicerContext) -> pb.DropCollectionResponse:
        self.catalog.drop_collection(request.name)
        return pb.DropCollectionResponse()


class PointsService(pb_grpc.PointsServicer):
    def __init__(self, catalog: Catalog, search_threads: int = 1) -> None:
        self.catalog = catalog
        self._searches = SearchCoalescer(on_start=_one_thread_per_search, threads=search_threads)

    def _upsert(self, request: pb.UpsertRequest) -> int:
        if len(request.points) > MAX_BATCH_POINTS:
            raise ResourceExhaustedError(f"points: {len(request.points)} in one batch; at most {MAX_BATCH_POINTS}",
                                         field="points")
        collection = self.catalog.get_collection(request.collection)
        records = [convert.from_pb_point(p, f"points[{i}]") for i, p in enumerate(request.points)]
        vectors = convert.from_pb_vectors(request.vectors) if request.HasField("vectors") else None
        texts = [r.text for r in records]
        checkpoint = None
        if request.checkpoint_name or request.checkpoint_json:
            checkpoint = (request.checkpoint_name, convert.from_json(request.checkpoint_json, "checkpoint_json"))
        return collection.upsert([r.id for r in records], texts=texts if any(t is not None for t in texts) else None,
                                 vectors=vectors, metadata=[r.metadata for r in records], checkpoint=checkpoint)

    @rpc
    def Upsert(self, request: pb.UpsertRequest, context: grpc.ServicerContext) -> pb.UpsertResponse:
        return pb.UpsertResponse(written=self._upsert(request))

    def UpsertStream(self, requests: Iterator[pb.UpsertRequest],
                     context: grpc.ServicerContext) -> Iterator[pb.UpsertResponse]:
        """Each batch commits in its own transaction and is acknowledged; a bad batch ends the stream.
        When the stream ends, what the collections still hold in their write buffers is indexed, so
        a bulk load is fully indexed once the call returns."""
        batch, touched = -1, set()
        try:
            with contextlib.ExitStack() as bulk:  # lexical commits grouped while the stream lasts
                for batch, request in enumerate(requests):
                    if request.collection not in touched:
                        bulk.enter_context(self.catalog.get_collection(request.collection).bulk())
                        touched.add(request.collection)
                    yield pb.UpsertResponse(written=self._upsert(request), batch=batch)
                for name in sorted(touched):
                    self.catalog.get_collection(name).flush_index()
        except NestvecError as err:
            err.message = f"batch {batch}: {err.message} (batches before it are committed)"
            _abort(context, err)

    @rpc
    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        return pb.DeleteResponse(deleted=self.catalog.get_collection(request.collection).delete(list(request.ids)))

    @rpc
    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetResponse:
        records = self.catalog.get_collection(request.collection).get(list(request.ids))
        return pb.GetResponse(points=[convert.to_pb_point(r) if r else pb.Point(id=i)
                                      for i, r in zip(request.ids, records, strict=True)],
                              found=[r is not None for r in records])

    @rpc
    def Count(self, request: pb.CountRequest, context: grpc.ServicerContext) -> pb.CountResponse:
        return pb.CountResponse(count=self.catalog.get_collection(request.collection).count())

    def _search(self, collection: AnyCollection, queries: Sequence[str] | Any, k: int, filter_json: str,
                params: pb.SearchParams, model: str, vectors: Any = None) -> list[list[Hit]]:
        flt = convert.from_json(filter_json, "filter")
        k = _k(k)
        options = convert.from_pb_params(params)
        options["model"] = model or None
        results: list[list[Hit]] = self._searches.run_alone(lambda: collection.search_batch(
            queries, k, flt, vectors=vectors, **options))
        return results

    @rpc
    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        which = request.WhichOneof("query")
        if which is None:
            raise invalid("query", "give text or vector")
        text_vector = None
        if which == "vector":
            query: Any = convert.from_pb_vectors(request.vector, "vector")
            if len(query) != 1:
                raise invalid("vector", f"must hold exactly one row, got {len(query)}")
            if request.HasField("text_vector"):
                raise invalid("text_vector", "goes with a text query, not a vector one")
        else:
            query = [request.text]
            if request.HasField("text_vector"):
                text_vector = convert.from_pb_vectors(request.text_vector, "text_vector")
                if len(text_vector) != 1:
                    raise invalid("text_vector", f"must hold exactly one row, got {len(text_vector)}")
        collection = self.catalog.get_collection(request.collection)
        options = convert.from_pb_params(request.params)
        if options["mode"] != "dense" or options["allow_partial"]:  # searched on its own, not coalesced
            rows = self._search(collection, query, request.k, request.filter_json, request.params, request.model,
                                text_vector)
            return pb.SearchResponse(hits=[convert.to_pb_hit(h) for h in rows[0]], missing_shards=_missing(rows))
        # What can be wrong with one request alone is checked here, before it can share a turn:
        # the query (dimension, NaN, model; texts are encoded), k, nprobe. The filter is part of the
        # turn's key, so a bad filter fails only the requests that sent that same filter.
        k, nprobe = _k(request.k), check_nprobe(options["nprobe"])
        check_fusion(options["mode"], options["fusion"], options["rrf_k"], options["alpha"])
        rescore = options["rescore_candidates"]
        flt = convert.from_json(request.filter_json, "filter")
        vector = collection.embed_queries(query if text_vector is None else text_vector, request.model or None)
        with_vectors = options["with_vectors"]
        key = (id(collection), k, request.filter_json, rescore, nprobe, with_vectors)
        hits = self._searches.search(key, vector[0], lambda vectors: collection.search_batch(
            vectors, k, flt, rescore_candidates=rescore, nprobe=nprobe, with_vectors=with_vectors))
        return pb.SearchResponse(hits=[convert.to_pb_hit(h) for h in hits])

    @rpc
    def SearchBatch(self, request: pb.SearchBatchRequest, context: grpc.ServicerContext) -> pb.SearchBatchResponse:
        vectors: Any = convert.from_pb_vectors(request.vectors) if request.HasField("vectors") else None
        queries: Any = list(request.texts) if request.texts else vectors
        if queries is None or not len(queries):
            raise invalid("queries", "empty batch")
        results = self._search(self.catalog.get_collection(request.collection), queries, request.k,
                               request.filter_json, request.params, request.model,
                               vectors if request.texts else None)
        return pb.SearchBatchResponse(results=[pb.SearchResponse(hits=[convert.to_pb_hit(h) for h in hits])
                                               for hits in results], missing_shards=_missing(results))


def _missing(results: Any) -> list[int]:
    """The shards a sharded collection's partial answer lacks (none for a local collection)."""
    return list(getattr(results, "missing_shards", ()))


class DiagnosticsService(pb_grpc.DiagnosticsServicer):
    def __init__(self, stats: MethodStats) -> None:
        self.stats = stats

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return pb.StatsResponse(methods=[pb.MethodStats(**row) for row in self.stats.snapshot()],
                                uptime_s=time.monotonic() - self.stats.started)


def _one_thread_per_search() -> None:
    """OpenMP's thread count is per calling thread: without this, each request thread's first faiss
    call starts a team of OpenMP workers that spin after every parallel region (measured: the same
    searches cost twice the CPU in a pool thread as in the main thread)."""
    import faiss

    faiss.omp_set_num_threads(1)


def build_server(catalog: Catalog, *, address: str = "127.0.0.1:50051", api_keys: Sequence[str] = (),
                 read_only_keys: Sequence[str] = (), tls_cert: Path | None = None, tls_key: Path | None = None,
                 max_workers: int = 16, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 search_threads: int = 1) -> tuple[grpc.Server, int]:
    """A ready-to-start server and its bound port (pass port 0 to pick a free one)."""
    stats = MethodStats()
    interceptors: list[grpc.ServerInterceptor] = [StatsInterceptor(stats), ParseInterceptor()]
    if api_keys or read_only_keys:
        interceptors.insert(0, AuthInterceptor(api_keys, read_only_keys))
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, initializer=_one_thread_per_search),
                         interceptors=interceptors, options=options)
    pb_grpc.add_CollectionsServicer_to_server(CollectionsService(catalog), server)
    pb_grpc.add_PointsServicer_to_server(PointsService(catalog, search_threads), server)
    pb_grpc.add_DiagnosticsServicer_to_server(DiagnosticsService(stats), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name[s].full_name for s in ("Collections", "Points", "Diagnostics")]
    for name in [*names, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise invalid("tls", "give both --tls-cert and --tls-key")
        creds = grpc.ssl_server_credentials([(tls_key.read_bytes(), tls_cert.read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise invalid("port", f"could not bind {address}")
    return server, port


def _open_all(catalog: Catalog) -> None:
    """Open every collection before taking calls, so no first search pays for loading its index,
    then move what loading left behind out of the collector's sight: a full collection over it
    stalled every thread for ~20 ms (measured on a 100k SPANN collection)."""
    for name in catalog.list_collections():
        try:
            catalog.get_collection(name)
        except NestvecError as err:  # a broken collection must not keep the others offline
            log.error("collection %s: %s", name, err.message)
    gc.collect()
    gc.freeze()


def serve(data: Path, *, port: int, host: str = "0.0.0.0", grace_s: float = 30.0, ray: str | None = None,
          max_disk_bytes: int | None = None, **kwargs: Any) -> None:
    """Run until SIGINT/SIGTERM; then stop taking calls and let in-flight ones (writes included) finish.
    With `ray`, sharded collections live on that Ray cluster; `max_disk_bytes` caps each collection
    on disk (see Catalog)."""
    import faiss
    from threadpoolctl import threadpool_limits

    check_search_threads(kwargs.get("search_threads", 1))  # before any collection is opened

    # Concurrency comes from the request threads; OpenMP or BLAS threads per search would
    # oversubscribe the cores (OpenBLAS called from 8 threads at once, each with its own pool,
    # cut 8-client throughput on SPANN from ~200 to 25 searches/s).
    faiss.omp_set_num_threads(1)
    threadpool_limits(1, user_api="blas")  # BLAS only: torch's encoding threads are left alone
    with Catalog(data, ray=ray, max_disk_bytes=max_disk_bytes) as catalog:
        _open_all(catalog)
        server, bound = build_server(catalog, address=f"{host}:{port}", **kwargs)
        server.start()
        stopping = threading.Event()

        def stop(signum: int, frame: object) -> None:
            log.warning("signal %s: draining in-flight calls (up to %.0f s)", signum, grace_s)
            stopping.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)
        print(f"nestvec serving {data} on {host}:{bound}", flush=True)
        stopping.wait()
        server.stop(grace_s).wait()
