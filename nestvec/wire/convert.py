"""Every proto <-> nestvec.types / numpy conversion, and nowhere else (round-trip tested)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from nestvec.errors import invalid
from nestvec.types import Hit, JSONDict, Record
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
    return message


def from_pb_hit(message: pb.Hit) -> Hit:
    return Hit(message.id, float(message.score), message.text if message.HasField("text") else None,
               from_json_object(message.metadata_json, "hit.metadata_json"))
