"""Checks of what callers hand a collection, with errors naming the field: shared by a local
collection and the front door of a sharded one, so both refuse the same input the same way."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from nestvec.errors import invalid
from nestvec.types import JSONDict

MAX_K = 10_000
MAX_DIM = 65_536  # the widest embedding models make 4,096-d vectors; 2**32-1 asked for a 16 GiB array
MAX_ID_BYTES = 256
JOB_PREFIX = b"job/"       # meta keys of bulk jobs' checkpoints
MAX_JOB_NAME, MAX_CHECKPOINT_BYTES = 200, 64 << 10
IdLike = str | int


def check_checkpoint(checkpoint: tuple[str, JSONDict] | None) -> dict[bytes, bytes]:
    """The meta entry a checkpoint is stored as (none without one)."""
    if checkpoint is None:
        return {}
    if not isinstance(checkpoint, tuple) or len(checkpoint) != 2:
        raise invalid("checkpoint", "must be a (job name, state dict) pair")
    name, state = checkpoint
    if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_JOB_NAME:
        raise invalid("checkpoint", f"job name must be a non-empty string of at most {MAX_JOB_NAME} bytes")
    if not isinstance(state, dict):
        raise invalid("checkpoint", f"state must be a JSON object, got {type(state).__name__}")
    try:
        value = json.dumps(state, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise invalid("checkpoint", f"state is not JSON: {err}") from None
    if len(value) > MAX_CHECKPOINT_BYTES:
        raise invalid("checkpoint", f"state is {len(value)} bytes; at most {MAX_CHECKPOINT_BYTES}")
    return {JOB_PREFIX + name.encode(): value}


def check_ids(ids: Sequence[IdLike], field: str = "ids") -> list[str]:
    if isinstance(ids, str | int) or not isinstance(ids, Sequence):
        raise invalid(field, "must be a list of ids")
    out: list[str] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(ids):
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise invalid(f"{field}[{i}]", f"must be a string or integer, got {type(raw).__name__}")
        value = str(raw)
        if not value or len(value.encode()) > MAX_ID_BYTES:
            raise invalid(f"{field}[{i}]", f"must be 1 to {MAX_ID_BYTES} bytes of UTF-8")
        if value in seen:
            raise invalid(field, f"duplicate id {value!r} at positions {seen[value]} and {i}")
        seen[value] = i
        out.append(value)
    return out


def check_metadata(metadata: Sequence[JSONDict | None] | None, n: int) -> list[JSONDict]:
    if metadata is None:
        return [{} for _ in range(n)]
    if len(metadata) != n:
        raise invalid("metadata", f"has {len(metadata)} entries for {n} ids")
    out = []
    for i, meta in enumerate(metadata):
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
            raise invalid(f"metadata[{i}]", "must be a JSON object with string keys")
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise invalid(f"metadata[{i}]", f"is not JSON-serialisable: {err}") from None
        out.append(meta)
    return out


def check_vectors(vectors: Any, dim: int, field: str) -> np.ndarray:
    """float32 [n, dim], finite, non-zero, L2-normalised (the collection's metric is cosine)."""
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise invalid(field, f"must be numeric: {err}") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        got = arr.shape[-1] if arr.ndim >= 1 else 0
        raise invalid(field, f"wrong dimension: collection has dim {dim}, got {got} (shape {arr.shape})")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise invalid(f"{field}[{int(np.argmax(bad))}]", "contains NaN or inf")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise invalid(f"{field}[{int(np.argmax(norms[:, 0] == 0))}]", "is the zero vector")
    return np.ascontiguousarray(arr / norms, dtype=np.float32)


def check_dim(dim: int | None) -> int | None:
    """None (the encoder's) or a positive integer up to MAX_DIM, checked before anything is allocated."""
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or not 1 <= dim <= MAX_DIM:
        raise invalid("dim", f"must be an integer between 1 and {MAX_DIM}, got {dim!r}")
    return int(dim)


def check_nprobe(nprobe: int | None) -> int | None:
    if nprobe is None or nprobe == 0:
        return None
    if isinstance(nprobe, bool) or not isinstance(nprobe, int | np.integer) or not 1 <= nprobe <= 65_536:
        raise invalid("nprobe", f"must be an integer between 1 and 65536, got {nprobe!r}")
    return int(nprobe)


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise invalid("k", f"must be an integer between 1 and {MAX_K}, got {k!r}")
    return int(k)


def check_upsert(ids: Sequence[IdLike], texts: Sequence[str | None] | None, vectors: Any,
                 metadata: Sequence[JSONDict | None] | None,
                 dim: int) -> tuple[list[str], list[str | None] | None, np.ndarray | None, list[JSONDict]]:
    """(ids, texts, vectors or None when the texts are to be encoded, metadata) of an upsert."""
    keys = check_ids(ids)
    n = len(keys)
    if n == 0:
        raise invalid("ids", "empty batch")
    if texts is not None:
        if isinstance(texts, str) or len(texts) != n:
            raise invalid("texts", f"must be a list with one entry per id ({n})")
        for i, text in enumerate(texts):
            if text is not None and not isinstance(text, str):
                raise invalid(f"texts[{i}]", f"must be a string, got {type(text).__name__}")
    metas = check_metadata(metadata, n)
    vecs = None
    if vectors is not None:
        vecs = check_vectors(vectors, dim, "vectors")
        if len(vecs) != n:
            raise invalid("vectors", f"has {len(vecs)} rows for {n} ids")
    elif texts is None:
        raise invalid("texts", "give texts, vectors or both")
    else:
        missing = [i for i, t in enumerate(texts) if t is None]
        if missing:
            raise invalid(f"texts[{missing[0]}]", "is null and no vector was given")
    return keys, None if texts is None else list(texts), vecs, metas
