"""A collection: the one place that composes encoder + codec + index + storage.

LMDB is the source of truth; the in-RAM flat index and metadata columns are rebuilt from it on
open and updated only after a write transaction has committed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nestvec.compression import Codec, make_codec
from nestvec.concurrency import ReadWriteLock
from nestvec.encoders import Encoder, load_encoder
from nestvec.errors import FailedPreconditionError, NotFoundError, invalid
from nestvec.fsutil import read_json, write_json
from nestvec.index.filters import MetadataTable
from nestvec.index.flat import FlatIndex
from nestvec.index.store import LmdbStore, Put
from nestvec.index.topk import rerank
from nestvec.types import CollectionConfig, Hit, JSONDict, Record

MAX_K = 10_000
# Until a codec that needs fitting has this many vectors (or fit_codec() is called), vectors are
# kept as exact float32 "staged" codes; then the codec is fitted on all of them and they are
# re-encoded in one transaction. Small collections thus stay exact and never fit on a handful.
FIT_THRESHOLD = 1024
CODES_FORMAT = b"codes_format"
STAGED, ENCODED = b"staged-fp32", b"codec"
MAX_ID_BYTES = 256
DEFAULT_RESCORE_FACTOR = 4
CONFIG_FILE = "collection.json"
CODEC_DIR = "codec"
STORE_DIR = "data.lmdb"

IdLike = str | int
QueryLike = str | Sequence[float] | np.ndarray


def _check_ids(ids: Sequence[IdLike], field: str = "ids") -> list[str]:
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


def _check_metadata(metadata: Sequence[JSONDict | None] | None, n: int) -> list[JSONDict]:
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


def _check_vectors(vectors: Any, dim: int, field: str) -> np.ndarray:
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


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise invalid("k", f"must be an integer between 1 and {MAX_K}, got {k!r}")
    return int(k)


class Collection:
    """Documents, codes and metadata of one collection, searchable exactly through its codec."""

    def __init__(self, folder: Path, *, encoder: Encoder | None = None) -> None:
        self.folder = folder
        self.config = CollectionConfig.from_json(read_json(folder / CONFIG_FILE))
        self.codec = Codec.load(folder / CODEC_DIR)
        self._encoder: Encoder | None = None
        if encoder is not None:
            self._attach_encoder(encoder)
        self._lock = ReadWriteLock()
        self._closed: str | None = None
        self._staging_codec = make_codec("fp32", self.config.dim)
        self.store = LmdbStore(folder / STORE_DIR)
        codes_format = self.store.get_meta(CODES_FORMAT)
        if codes_format is None:
            codes_format = ENCODED if self.codec.fitted else STAGED
            self.store.write([], meta={CODES_FORMAT: codes_format})
        self._staged = codes_format == STAGED
        self._load_index()
        if self._staged and self.codec.fitted:
            self._encode_staged()  # a crash came between saving the fitted codec and re-encoding: finish it

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, name: str, *, encoder: Encoder | None, dim: int | None,
               codec: str) -> Collection:
        """Write the config and (unfitted) codec into `folder`, which must not exist yet."""
        if encoder is not None:
            if dim is not None and dim != encoder.dim:
                raise invalid("dim", f"encoder {encoder.identity.model} makes {encoder.dim}-d vectors, not {dim}")
            dim = encoder.dim
        if dim is None or isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise invalid("dim", "a collection without an encoder needs a positive integer dim")
        spec = make_codec(codec, dim)
        config = CollectionConfig(name=name, dim=dim, codec=spec.spec,
                                  encoder=encoder.identity if encoder else None)
        spec.save(folder / CODEC_DIR)
        write_json(folder / CONFIG_FILE, config.to_json())
        return cls(folder, encoder=encoder)

    def close(self, reason: str = "closed") -> None:
        if self._closed is None:
            self._closed = reason
            self.store.close()

    def _check_open(self) -> None:
        if self._closed is not None:
            raise NotFoundError(f"collection {self.name!r} was {self._closed}; open it again from its client")

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def scan_codec(self) -> Codec:
        """The codec the stored codes are in now: float32 while staged, then the collection's codec."""
        return self._staging_codec if self._staged else self.codec

    @property
    def fit_threshold(self) -> int:
        return max(self.codec.min_fit_size, FIT_THRESHOLD)

    def _load_index(self) -> None:
        self.index = FlatIndex(self.scan_codec)
        self.metadata = MetadataTable()
        keys, documents, codes = self.store.load(self.scan_codec.bytes_per_vector)
        self._ids: list[str] = [k.decode() for k in keys]
        self._row_of: dict[str, int] = {key: row for row, key in enumerate(self._ids)}
        self.index.append(codes)
        self.metadata.append([json.loads(d).get("metadata", {}) for d in documents])

    @property
    def name(self) -> str:
        return self.config.name

    # -- encoder -----------------------------------------------------------------------------
    def _attach_encoder(self, encoder: Encoder) -> None:
        expected = self.config.encoder
        if expected is None:
            raise FailedPreconditionError(f"collection {self.name!r} stores raw vectors and has no encoder")
        if encoder.identity.weights_sha256 != expected.weights_sha256 or encoder.dim != expected.dim:
            raise FailedPreconditionError(
                f"encoder {encoder.identity.model} ({encoder.identity.weights_sha256[:12]}) differs from "
                f"collection {self.name!r}'s {expected.model} ({expected.weights_sha256[:12]})")
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            if self.config.encoder is None:
                raise FailedPreconditionError(
                    f"collection {self.name!r} has no encoder: pass vectors instead of texts")
            self._attach_encoder(load_encoder(self.config.encoder.model))
        assert self._encoder is not None
        return self._encoder

    # -- writes ------------------------------------------------------------------------------
    def upsert(self, ids: Sequence[IdLike], texts: Sequence[str | None] | None = None,
               vectors: Any = None, metadata: Sequence[JSONDict | None] | None = None) -> int:
        """Insert or replace documents in one transaction; returns how many were written."""
        self._check_open()
        keys = _check_ids(ids)
        n = len(keys)
        if n == 0:
            raise invalid("ids", "empty batch")
        if texts is not None:
            if isinstance(texts, str) or len(texts) != n:
                raise invalid("texts", f"must be a list with one entry per id ({n})")
            for i, text in enumerate(texts):
                if text is not None and not isinstance(text, str):
                    raise invalid(f"texts[{i}]", f"must be a string, got {type(text).__name__}")
        metas = _check_metadata(metadata, n)
        if vectors is not None:
            vecs = _check_vectors(vectors, self.config.dim, "vectors")
            if len(vecs) != n:
                raise invalid("vectors", f"has {len(vecs)} rows for {n} ids")
        elif texts is None:
            raise invalid("texts", "give texts, vectors or both")
        else:
            missing = [i for i, t in enumerate(texts) if t is None]
            if missing:
                raise invalid(f"texts[{missing[0]}]", "is null and no vector was given")
            vecs = self.encoder.encode([t or "" for t in texts], kind="document")
        with self._lock.write():
            codes = self.scan_codec.encode(vecs)
            rescore = self.codec.rescore.encode(vecs) if self.codec.rescore and not self._staged else None
            puts = [
                Put(key.encode(),
                    json.dumps({"text": texts[i] if texts is not None else None, "metadata": metas[i]}).encode(),
                    codes[i].tobytes(), None if rescore is None else rescore[i].tobytes())
                for i, key in enumerate(keys)
            ]
            self.store.write(puts)
            self._forget([k for k in keys if k in self._row_of])
            rows = self.index.append(codes)
            self.metadata.append(metas)
            for key, row in zip(keys, rows.tolist(), strict=True):
                self._ids.append(key)
                self._row_of[key] = row
            self._maybe_compact()
            if self._staged and self.count() >= self.fit_threshold:
                self._fit_locked(self._staging_codec.decode(self.index.codes()[self.index.live[: self.index.rows]]))
        return n

    def fit_codec(self, sample: Any) -> None:
        """Fit the codec on a representative sample now (while its vectors are still staged or none exist)."""
        self._check_open()
        vecs = _check_vectors(sample, self.config.dim, "sample")
        with self._lock.write():
            if not self._staged and self.count() > 0:
                raise FailedPreconditionError(f"collection {self.name!r} already holds codes; its codec is fixed")
            self._fit_locked(vecs)

    def _fit_locked(self, sample: np.ndarray) -> None:
        """Fit once, then freeze: codes are never re-calibrated per batch."""
        self.codec.fit(sample)
        if self._staged:
            self._encode_staged()
        else:
            self.codec.save(self.folder / CODEC_DIR)

    def _encode_staged(self) -> None:
        """Re-encode the staged float32 vectors with the fitted codec.

        The codec is saved first; the codes and the format flag then change in one LMDB
        transaction. A crash in between is finished on the next open.
        """
        keep = self.index.compact()
        self.metadata.compact(keep)
        self._ids = [self._ids[i] for i in keep.tolist()]
        self._row_of = {key: row for row, key in enumerate(self._ids)}
        vectors = self._staging_codec.decode(self.index.codes())
        codes = self.codec.encode(vectors)
        rescore = self.codec.rescore.encode(vectors) if self.codec.rescore else None
        self.codec.save(self.folder / CODEC_DIR)
        self.store.rewrite_codes([k.encode() for k in self._ids], codes, rescore, {CODES_FORMAT: ENCODED})
        self._staged = False
        self.index = FlatIndex(self.codec)
        self.index.append(codes)

    def delete(self, ids: Sequence[IdLike]) -> int:
        """Remove documents in one transaction; unknown ids are ignored. Returns how many existed."""
        self._check_open()
        keys = _check_ids(ids)
        with self._lock.write():
            present = [k for k in keys if k in self._row_of]
            if present:
                self.store.write([], [k.encode() for k in present])
                self._forget(present)
                self._maybe_compact()
        return len(present)

    def _forget(self, keys: Sequence[str]) -> None:
        rows = np.array([self._row_of.pop(k) for k in keys], dtype=np.int64)
        if len(rows):
            self.index.remove(rows)
            self.metadata.remove(rows)

    def _maybe_compact(self) -> None:
        dead = self.index.tombstones
        if dead > 1024 and dead * 2 > self.index.rows:
            keep = self.index.compact()
            self.metadata.compact(keep)
            self._ids = [self._ids[i] for i in keep.tolist()]
            self._row_of = {key: row for row, key in enumerate(self._ids)}

    # -- reads -------------------------------------------------------------------------------
    def count(self) -> int:
        self._check_open()
        return len(self._row_of)

    def get(self, ids: Sequence[IdLike]) -> list[Record | None]:
        self._check_open()
        keys = _check_ids(ids)
        out: list[Record | None] = []
        for key, raw in zip(keys, self.store.get_documents([k.encode() for k in keys]), strict=True):
            doc = None if raw is None else json.loads(raw)
            out.append(None if doc is None else Record(key, doc["text"], doc["metadata"]))
        return out

    def embed_queries(self, queries: str | Sequence[str] | np.ndarray | Sequence[Sequence[float]],
                      model: str | None = None) -> np.ndarray:
        """Texts are encoded with the collection's encoder; vectors are checked against it."""
        if isinstance(queries, str):
            queries = [queries]
        if isinstance(queries, Sequence) and queries and all(isinstance(q, str) for q in queries):
            return self.encoder.encode([str(q) for q in queries], kind="query")
        if model is not None and (self.config.encoder is None or not self.config.encoder.matches(model)):
            have = self.config.encoder.model if self.config.encoder else "raw vectors"
            raise FailedPreconditionError(f"query vectors come from {model!r}; collection {self.name!r} holds {have}")
        vectors = _check_vectors(queries, self.config.dim, "query") if len(queries) else np.zeros((0, 0))
        if not len(vectors):
            raise invalid("queries", "empty batch")
        return vectors

    def search(self, query: QueryLike, k: int = 10, filter: JSONDict | None = None, *,
               model: str | None = None, rescore_candidates: int | None = None) -> list[Hit]:
        """Top-k hits for one query text or vector."""
        if not isinstance(query, str) and np.asarray(query).ndim != 1:
            raise invalid("query", "must be one text or one vector; use search_batch for several")
        return self.search_batch([query] if isinstance(query, str) else np.asarray(query)[None, :], k, filter,
                                 model=model, rescore_candidates=rescore_candidates)[0]

    def search_batch(self, queries: Sequence[str] | np.ndarray | Sequence[Sequence[float]], k: int = 10,
                     filter: JSONDict | None = None, *, model: str | None = None,
                     rescore_candidates: int | None = None) -> list[list[Hit]]:
        self._check_open()
        k = _check_k(k)
        with self._lock.read():
            allowed = self.metadata.evaluate(filter)
        vectors = self.embed_queries(queries, model)
        with self._lock.read():
            scores, rows = self.search_vectors(vectors, k, allowed, rescore_candidates)
            ids = [[self._ids[r] for r in row if r >= 0] for row in rows.tolist()]
        flat_ids = sorted({i for row in ids for i in row})
        docs = dict(zip(flat_ids, self.store.get_documents([i.encode() for i in flat_ids]), strict=True))
        out = []
        for row_ids, row_scores in zip(ids, scores.tolist(), strict=True):
            hits = []
            for key, score in zip(row_ids, row_scores, strict=False):
                doc = json.loads(docs[key] or b"{}")
                hits.append(Hit(key, float(score), doc.get("text"), doc.get("metadata", {})))
            hits.sort(key=lambda h: (-h.score, h.id))
            out.append(hits)
        return out

    def search_vectors(self, vectors: np.ndarray, k: int, allowed: np.ndarray | None = None,
                       rescore_candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Arrays in, arrays out: (scores, rows) [nq, k], rows padded with -1."""
        if self.codec.rescore is None or self._staged:
            return self.index.search(vectors, k, allowed)
        wide = max(k, rescore_candidates or DEFAULT_RESCORE_FACTOR * k)
        _, rows = self.index.search(vectors, wide, allowed)
        return self._rescore(vectors, rows, k)

    def _rescore(self, vectors: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-rank candidates with the higher-precision codes kept on disk (read only for candidates)."""
        assert self.codec.rescore is not None
        refiner = self.codec.rescore
        valid = rows >= 0
        keys = [self._ids[r].encode() for r in rows[valid].tolist()]
        codes = np.zeros((*rows.shape, refiner.bytes_per_vector), dtype=np.uint8)
        codes[valid] = self.store.get_rescore_codes(keys, refiner.bytes_per_vector)
        return rerank(refiner.candidate_scores(vectors, codes), rows, k)

    def info(self) -> JSONDict:
        self._check_open()
        enc = self.config.encoder
        return {
            "name": self.name,
            "count": self.count(),
            "dim": self.config.dim,
            "codec": self.codec.spec,
            "codec_fitted": self.codec.fitted,
            "staged_vectors": self.count() if self._staged else 0,
            "fit_threshold": self.fit_threshold,
            "bytes_per_vector": self.codec.bytes_per_vector,
            "stored_bytes_per_vector": self.codec.stored_bytes_per_vector,
            "compression_ratio": round(4 * self.config.dim / self.codec.bytes_per_vector, 2),
            "encoder": enc.to_json() if enc else None,
            "metadata_fields": sorted(self.metadata.fields),
            "disk_bytes": self.store.disk_bytes(),
        }


