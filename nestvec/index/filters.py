"""Metadata filters (Mongo/Chroma-style) evaluated column-wise over the rows of an index.

Grammar: {"field": value} | {"field": {"$eq"|"$ne"|"$gt"|"$gte"|"$lt"|"$lte"|"$in"|"$nin": v}}
| {"$and": [f, ...]} | {"$or": [f, ...]}; several keys in one dict are AND-ed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nestvec.errors import invalid
from nestvec.types import JSONDict

_MISSING = object()
_COMPARISONS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "$gt": np.greater, "$gte": np.greater_equal, "$lt": np.less, "$lte": np.less_equal,
}
_MEMBERSHIP = ("$eq", "$ne", "$in", "$nin")
OPERATORS = (*_MEMBERSHIP, *_COMPARISONS)
# Checked before any work: an $or of 50,000 conditions held the server's search thread for 5 s on
# 300 rows, as each condition scans every row (API fuzzer; long lists of values belong in one $in),
# and a filter dict 500 deep overflowed the evaluator's recursion (RecursionError, embedded client).
MAX_DEPTH, MAX_CONDITIONS = 32, 256


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps True apart from 1 (JSON booleans are not numbers)."""
    return a is not _MISSING and isinstance(a, bool) == isinstance(b, bool) and a == b


def _hashable_key(v: Any) -> Any:
    return (type(v) is bool, v) if isinstance(v, str | int | float | bool) or v is None else None


def _check_size(spec: JSONDict) -> None:
    """Depth and number of conditions, walked without recursion (what is checked must not overflow)."""
    stack, conditions = [(spec, 1)], 0
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise invalid("filter", f"$and / $or nest more than {MAX_DEPTH} deep")
        for key, value in node.items():
            conditions += 1
            if conditions > MAX_CONDITIONS:
                raise invalid("filter", f"has more than {MAX_CONDITIONS} conditions (put long lists in one $in)")
            if key in ("$and", "$or") and isinstance(value, list):
                stack.extend((v, depth + 1) for v in value if isinstance(v, dict))


class MetadataTable:
    """Row-aligned metadata plus lazily built per-field columns for vectorised filtering."""

    def __init__(self) -> None:
        self._rows: list[JSONDict | None] = []
        self._field_counts: Counter[str] = Counter()
        self._columns: dict[str, np.ndarray] = {}
        self._numeric: dict[str, np.ndarray] = {}
        self._present: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def fields(self) -> set[str]:
        return {f for f, n in self._field_counts.items() if n > 0}

    def row(self, row: int) -> JSONDict:
        return dict(self._rows[row] or {})

    def append(self, metadata: Sequence[JSONDict]) -> None:
        for meta in metadata:
            self._rows.append(meta)
            self._field_counts.update(meta.keys())
        self._invalidate()

    def remove(self, rows: Sequence[int] | np.ndarray) -> None:
        for row in np.asarray(rows, dtype=np.int64).tolist():
            meta = self._rows[row]
            if meta is not None:
                self._field_counts.subtract(meta.keys())
                self._rows[row] = None
        self._invalidate()

    def compact(self, keep: np.ndarray) -> None:
        self._rows = [self._rows[i] for i in keep.tolist()]
        self._invalidate()

    def _invalidate(self) -> None:
        self._columns.clear()
        self._numeric.clear()
        self._present = None

    def present(self) -> np.ndarray:
        """Mask of rows that hold a live document (removed rows are False)."""
        if self._present is None:
            self._present = np.array([m is not None for m in self._rows], dtype=bool)
        return self._present

    def column(self, field: str) -> np.ndarray:
        if field not in self._columns:
            col = np.empty(len(self._rows), dtype=object)
            col[:] = [(m.get(field, _MISSING) if m is not None else _MISSING) for m in self._rows]
            self._columns[field] = col
        return self._columns[field]

    def numeric_column(self, field: str) -> np.ndarray:
        """float64 view of a field; NaN where missing or not a number (NaN compares False)."""
        if field not in self._numeric:
            col = self.column(field)
            self._numeric[field] = np.array([float(v) if _is_number(v) else np.nan for v in col],
                                            dtype=np.float64)
        return self._numeric[field]

    def evaluate(self, spec: JSONDict | None) -> np.ndarray | None:
        """Boolean row mask for `spec`, or None for no filter; raises InvalidArgumentError on bad specs."""
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise invalid("filter", f"must be a JSON object, got {type(spec).__name__}")
        _check_size(spec)
        return self._node(spec, "filter")

    def _node(self, spec: JSONDict, path: str) -> np.ndarray:
        mask = np.ones(len(self._rows), dtype=bool)
        for key, value in spec.items():
            if not isinstance(key, str):
                raise invalid(path, f"keys must be strings, got {key!r}")
            if key in ("$and", "$or"):
                if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
                    raise invalid(f"{path}.{key}", "must be a non-empty list of filter objects")
                parts = [self._node(v, f"{path}.{key}[{i}]") for i, v in enumerate(value)]
                mask &= np.logical_and.reduce(parts) if key == "$and" else np.logical_or.reduce(parts)
            elif key.startswith("$"):
                raise invalid(f"{path}.{key}", f"unknown operator {key!r} (expected $and, $or or a field)")
            else:
                mask &= self._field(key, value, f"{path}.{key}")
        return mask

    def _field(self, field: str, condition: Any, path: str) -> np.ndarray:
        ops = condition if isinstance(condition, dict) else {"$eq": condition}
        if not ops:
            raise invalid(path, "empty condition")
        for op in ops:
            if op not in OPERATORS:
                raise invalid(f"{path}.{op}", f"unknown operator {op!r}; expected one of {', '.join(OPERATORS)}")
        if field not in self.fields:
            raise invalid(path, f"no stored document has metadata field {field!r}")
        mask = np.ones(len(self._rows), dtype=bool)
        for op, value in ops.items():
            mask &= self._apply(field, op, value, f"{path}.{op}")
        return mask

    def _apply(self, field: str, op: str, value: Any, path: str) -> np.ndarray:
        if op in _COMPARISONS:
            if not _is_number(value):
                raise invalid(path, f"needs a number, got {value!r}")
            with np.errstate(invalid="ignore"):
                return _COMPARISONS[op](self.numeric_column(field), float(value))
        col = self.column(field)
        if op in ("$eq", "$ne"):
            if isinstance(value, dict | list):
                raise invalid(path, "needs a string, number, boolean or null")
            hit = np.frompyfunc(lambda x: _same(x, value), 1, 1)(col).astype(bool)
            return hit if op == "$eq" else ~hit & (col != _MISSING)
        if not isinstance(value, list) or any(_hashable_key(v) is None for v in value):
            raise invalid(path, "needs a list of strings, numbers, booleans or nulls")
        keys = {_hashable_key(v) for v in value}
        hit = np.frompyfunc(lambda x: x is not _MISSING and _hashable_key(x) in keys, 1, 1)(col).astype(bool)
        return hit if op == "$in" else ~hit & (col != _MISSING)
