"""Server interceptors: API-key auth on every RPC, request parsing and per-method call statistics."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
import numpy as np

# Writes are refused to read-only keys. Health checks stay open so load balancers can probe.
WRITE_METHODS = frozenset({
    "/nestvec.v1.Collections/Create", "/nestvec.v1.Collections/Drop", "/nestvec.v1.Points/Upsert",
    "/nestvec.v1.Points/UpsertStream", "/nestvec.v1.Points/Delete",
})
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _key_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        text = value.decode() if isinstance(value, bytes) else value
        if key == "x-api-key":
            return text
        if key == "authorization" and text.lower().startswith("bearer "):
            return text[7:]
    return None


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts."""

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class AuthInterceptor(grpc.ServerInterceptor):
    """`authorization: Bearer KEY` or `x-api-key: KEY` on every call (when any key is configured)."""

    def __init__(self, api_keys: Iterable[str], read_only_keys: Iterable[str] = ()) -> None:
        self.api_keys = frozenset(api_keys)
        self.read_only_keys = frozenset(read_only_keys)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        key = _key_from(details.invocation_metadata)
        if key is None or key not in self.api_keys | self.read_only_keys:
            why = "missing API key" if key is None else "invalid API key"
            return _denied(handler, grpc.StatusCode.UNAUTHENTICATED, f"{why} (send 'authorization: Bearer KEY')")
        if key in self.read_only_keys and key not in self.api_keys and method in WRITE_METHODS:
            return _denied(handler, grpc.StatusCode.PERMISSION_DENIED, f"read-only key may not call {method}")
        return handler


class ParseInterceptor(grpc.ServerInterceptor):
    """Parses request messages in the handler's thread instead of inside gRPC, so bytes that are no
    such message get INVALID_ARGUMENT naming it. gRPC's own parse failure answers INTERNAL, and on a
    request stream it also leaks the call: `server.stop(grace)` then never returned, not even after
    the grace (grpcio 1.7x; found by the fuzz torture, see tests/torture/test_fuzz.py)."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        parse = None if handler is None else handler.request_deserializer
        if handler is None or parse is None:
            return handler
        descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        message = getattr(descriptor, "full_name", "request message")

        def parsed(raw: bytes, context: grpc.ServicerContext, where: str) -> Any:
            try:
                return parse(raw)
            except Exception:  # protobuf's DecodeError, or anything a custom deserializer raises
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: the bytes are not a {message}")

        def stream(requests: Iterable[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            for i, raw in enumerate(requests):
                yield parsed(raw, context, f"request {i}")

        def from_stream(requests: Iterable[bytes], context: grpc.ServicerContext) -> Any:
            return inner(stream(requests, context), context)

        def from_unary(request: bytes, context: grpc.ServicerContext) -> Any:
            return inner(parsed(request, context, "request"), context)

        kind = ("stream_" if handler.request_streaming else "unary_") + (
            "stream" if handler.response_streaming else "unary")
        inner = getattr(handler, kind)
        behaviour = from_stream if handler.request_streaming else from_unary
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(behaviour, None, handler.response_serializer)


class MethodStats:
    """Call counts, errors and recent latencies (last `window` calls) per method."""

    def __init__(self, window: int = 10_000) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._latencies: dict[str, deque[float]] = {}
        self._calls: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._window = window

    def record(self, method: str, seconds: float, failed: bool) -> None:
        with self._lock:
            self._latencies.setdefault(method, deque(maxlen=self._window)).append(seconds * 1000)
            self._calls[method] = self._calls.get(method, 0) + 1
            self._errors[method] = self._errors.get(method, 0) + int(failed)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = []
            for method, values in sorted(self._latencies.items()):
                p50, p90, p99 = np.percentile(np.array(values), [50, 90, 99]) if values else (0.0, 0.0, 0.0)
                rows.append({"method": method, "calls": self._calls[method], "errors": self._errors[method],
                             "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)})
            return rows


class StatsInterceptor(grpc.ServerInterceptor):
    """Times unary calls and whole streams; a call that raises or aborts counts as an error."""

    def __init__(self, stats: MethodStats) -> None:
        self.stats = stats

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        if handler is None or handler.response_streaming or handler.request_streaming:
            return handler if handler is None else self._wrap_stream(handler, details.method)
        inner = handler.unary_unary

        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            start, failed = time.perf_counter(), True
            try:
                result = inner(request, context)
                failed = context.code() not in (None, grpc.StatusCode.OK)
                return result
            finally:
                self.stats.record(details.method, time.perf_counter() - start, failed)

        return grpc.unary_unary_rpc_method_handler(timed, handler.request_deserializer, handler.response_serializer)

    def _wrap_stream(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if not (handler.request_streaming and handler.response_streaming):
            return handler
        inner = handler.stream_stream

        def timed(requests: Any, context: grpc.ServicerContext) -> Any:
            start, failed = time.perf_counter(), True
            try:
                yield from inner(requests, context)
                failed = False
            finally:
                self.stats.record(method, time.perf_counter() - start, failed)

        return grpc.stream_stream_rpc_method_handler(timed, handler.request_deserializer,
                                                     handler.response_serializer)
