"""Stubs are current with the proto, and every conversion round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from nestvec.errors import InvalidArgumentError
from nestvec.types import Hit, Record
from nestvec.wire import convert
from nestvec.wire.generate import main as generate


def test_generated_stubs_are_not_stale() -> None:
    assert generate(["--check"]) == 0, "run: python -m nestvec.wire.generate"


def test_round_trips() -> None:
    matrix = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    assert np.array_equal(convert.from_pb_vectors(convert.to_pb_vectors(matrix)), matrix)
    for record in (Record("a", "text", {"x": 1, "y": [1, 2]}), Record("b", None, {}), Record("c", "", {})):
        assert convert.from_pb_point(convert.to_pb_point(record)) == record
    for hit in (Hit("a", 0.5, "t", {"k": "v"}), Hit("b", -1.0, None, {})):
        assert convert.from_pb_hit(convert.to_pb_hit(hit)) == hit


def test_malformed_wire_values_are_named() -> None:
    message = convert.to_pb_vectors(np.ones((2, 4)))
    message.count = 3
    with pytest.raises(InvalidArgumentError, match="vectors"):
        convert.from_pb_vectors(message)
    with pytest.raises(InvalidArgumentError, match="filter"):
        convert.from_json("{not json", "filter")
    with pytest.raises(InvalidArgumentError, match="metadata_json"):
        convert.from_json_object("[1, 2]", "points[0].metadata_json")
