"""Every proto <-> nestvec.types / numpy conversion, and nowhere else (round-trip tested)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from nestvec.errors import invalid
from nestvec.index.fusion import DEFAULT_ALPHA, DEFAULT_FUSION, DEFAULT_MODE, DEFAULT_RRF_K, check_fusion
from nestvec.types import Hit, JSONDict, Record, SearchOptions
from nestvec.wire._pb.nestvec.v1 import nestvec_pb2 as pb


def to_pb_vectors(array: Any) -> pb.Vectors:
    matrix = np.atleast_2d(np.asarray(array, dtype="<f4"))
    if matrix.ndim != 2:
        raise invalid("vectors", f"must be one vector or a 2-d array, got shape {matrix.shape}")
    return pb.Vectors(data=np.ascontiguousarray(matrix).tobytes(), dim=matrix.shape[1], count=matrix.shape[0])


def from_pb_vectors(message: pb.Vectors, field: str = "vectors") -> np.ndarray:
    expected = message.dim * message.count * 4
    if message.dim == 0 or len(message.data) != expected:
        raise invalid(field, f"has {len(message.data)} bytes; {message.count} x {message.dim} float32 take {expected}")
    return np.frombuffer(message.data, dtype="<f4").reshape(message.count, message.dim).astype(np.float32)


def to_json(data: JSONDict | None) -> str:
    return json.dumps(data) if data else ""


def from_json(text: str, field: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise invalid(field, f"is not valid JSON: {err}") from None
    except RecursionError:  # '[' * 100_000: the decoder's own depth limit, which was an INTERNAL error
        raise invalid(field, "nests too deeply to parse") from None


def from_json_object(text: str, field: str) -> JSONDict:
    value = from_json(text, field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(field, "must be a JSON object")
    return value


def to_pb_point(record: Record) -> pb.Point:
    point = pb.Point(id=record.id, metadata_json=to_json(record.metadata))
    if record.text is not None:
        point.text = record.text
    return point


def from_pb_point(point: pb.Point, field: str = "points") -> Record:
    return Record(point.id, point.text if point.HasField("text") else None,
                  from_json_object(point.metadata_json, f"{field}.metadata_json"))


def to_pb_hit(hit: Hit) -> pb.Hit:
    message = pb.Hit(id=hit.id, score=hit.score, metadata_json=to_json(hit.metadata))
    if hit.text is not None:
        message.text = hit.text
    for name in _SIDE_FIELDS:
        if (value := getattr(hit, name)) is not None:
            setattr(message, name, value)
    if hit.vector is not None:
        message.vector = np.ascontiguousarray(hit.vector, dtype="<f4").tobytes()
    return message


def from_pb_hit(message: pb.Hit) -> Hit:
    sides = {name: getattr(message, name) if message.HasField(name) else None for name in _SIDE_FIELDS}
    vector = np.frombuffer(message.vector, dtype="<f4").astype(np.float32) if message.vector else None
    return Hit(message.id, float(message.score), message.text if message.HasField("text") else None,
               from_json_object(message.metadata_json, "hit.metadata_json"), **sides, vector=vector)


_SIDE_FIELDS = ("dense_score", "dense_rank", "lexical_score", "lexical_rank")


def to_pb_params(options: SearchOptions) -> pb.SearchParams:
    """Checked here what the wire cannot carry (unsigned fields, 0 meaning "default"), with the
    embedded client's errors; the server checks the rest."""
    nprobe, rescore = options.get("nprobe"), options.get("rescore_candidates")
    if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int | np.integer) or nprobe < 0):
        raise invalid("nprobe", f"must be an integer between 1 and 65536, got {nprobe!r}")
    mode, fusion = options.get("mode", DEFAULT_MODE), options.get("fusion", DEFAULT_FUSION)
    rrf_k, alpha = options.get("rrf_k", DEFAULT_RRF_K), options.get("alpha", DEFAULT_ALPHA)
    check_fusion(mode, fusion, rrf_k, alpha)
    return pb.SearchParams(rescore_candidates=rescore or 0, nprobe=int(min(nprobe or 0, 2**32 - 1)), mode=mode,
                           fusion=fusion, rrf_k=int(min(rrf_k, 2**32 - 1)), alpha=float(alpha),
                           with_vectors=bool(options.get("with_vectors", False)),
                           allow_partial=bool(options.get("allow_partial", False)))


def from_pb_params(params: pb.SearchParams) -> SearchOptions:
    return SearchOptions(rescore_candidates=params.rescore_candidates or None, nprobe=params.nprobe or None,
                         mode=params.mode or DEFAULT_MODE, fusion=params.fusion or DEFAULT_FUSION,
                         rrf_k=params.rrf_k or DEFAULT_RRF_K,
                         alpha=params.alpha if params.HasField("alpha") else DEFAULT_ALPHA,
                         with_vectors=params.with_vectors, allow_partial=params.allow_partial)
