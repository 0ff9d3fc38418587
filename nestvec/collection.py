"""A collection: the one place that composes encoder + codec + index + storage.

LMDB is the source of truth. Small collections search a flat index of all codes in RAM, rebuilt
from LMDB on open. Large ones (or any, by choice) use the SPANN index, whose posting lists live
in the same LMDB environment and change in the same write transaction as the documents; only
its centroids, the id map, metadata columns and a small write buffer are in RAM. In-RAM state
changes only after a write transaction has committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import secrets
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from nestvec.checks import (
    JOB_PREFIX,
    IdLike,
    check_checkpoint,
    check_ids,
    check_k,
    check_nprobe,
    check_upsert,
    check_vectors,
)
from nestvec.collection_base import EncodedCollection
from nestvec.compression import Codec, make_codec
from nestvec.concurrency import ReadWriteLock
from nestvec.encoders import Encoder
from nestvec.errors import FailedPreconditionError, NotFoundError, ResourceExhaustedError, invalid
from nestvec.fsutil import read_json, write_json
from nestvec.index.buffered import BufferedSpann
from nestvec.index.filters import MetadataTable
from nestvec.index.flat import FlatIndex
from nestvec.index.fusion import (
    DEFAULT_ALPHA,
    DEFAULT_FUSION,
    DEFAULT_MODE,
    DEFAULT_RRF_K,
    FUSION_DEPTH,
    check_fusion,
    fuse,
)
from nestvec.index.lexical import open_lexical, release_lexical
from nestvec.index.postings import PostingStore
from nestvec.index.spann import SpannConfig, SpannIndex
from nestvec.index.store import LmdbStore, Put
from nestvec.index.topk import rerank
from nestvec.memory import trim_heap
from nestvec.types import CollectionConfig, EncoderIdentity, Hit, JSONDict, Record, UpsertBatch

log = logging.getLogger(__name__)
# Until a codec that needs fitting has this many vectors (or fit_codec() is called), vectors are
# kept as exact float32 "staged" codes; then the codec is fitted on all of them and they are
# re-encoded in one transaction. Small collections thus stay exact and never fit on a handful.
FIT_THRESHOLD = 1024
CODES_FORMAT = b"codes_format"
STAGED, ENCODED = b"staged-fp32", b"codec"
DEFAULT_RESCORE_FACTOR = 4
CONFIG_FILE = "collection.json"
CODEC_DIR = "codec"
STORE_DIR = "data.lmdb"
INDEX_DIR = "index"
INDEX_KINDS = ("auto", "flat", "spann")
# "auto" moves a collection from the flat scan to SPANN at this size: below it a scan of all
# codes in RAM is fast and exact; above it RAM and latency grow with every vector.
SPANN_AUTO_MIN = 20_000
FLUSH_ROWS = 4096          # write buffer size before it is flushed into the posting lists
REBUILD_GROWTH = 2.0       # rebuild the clustering when the collection has grown this much since
PURGE_FRACTION = 0.1       # rewrite lists holding tombstones once deletes reach this share
# A filter letting through at most this many vectors (or this share) is answered by an exact scan
# of just those codes; a looser one probes proportionally more lists.
FILTER_SCAN_MAX, FILTER_SCAN_SHARE, MAX_FILTER_WIDEN = 8192, 0.05, 4
INDEX_KIND, NEXT_VID, FLUSHED_UPTO, BUILT_COUNT = b"index_kind", b"next_vid", b"flushed_upto", b"built_count"
# A codec switch writes its codec and posting lists beside the live ones under a new generation
# token; one transaction makes them live. "" is a collection's first generation.
GENERATION, RECODE_PENDING, RECODE_RETIRED = b"generation", b"recode_pending", b"recode_retired"
# Every write batch gets the next LEXICAL_SEQ and logs the ids it changed under LEXICAL_LOG<seq>,
# in its LMDB transaction; the lexical index applies the batch after that commit, and replays
# from the log on open what a crash kept it from applying.
LEXICAL_SEQ, LEXICAL_LOG = b"lexical_seq", b"lexical_log/"
LEXICAL_DIR = "lexical"
# Lexical changes are committed at most this often (a tantivy commit costs ~16-37 ms; one per
# write held searches back under the write lock), and before any lexical or hybrid search.
LEXICAL_COMMIT_S = 1.0
RECODE_FIT_SAMPLE = 4096

QueryLike = str | Sequence[float] | np.ndarray


def _codec_dir(generation: str) -> str:
    return f"{CODEC_DIR}.{generation}" if generation else CODEC_DIR


def _postings_name(generation: str) -> bytes:
    return f"postings.{generation}".encode() if generation else b"postings"


def _pack(value: int) -> bytes:
    return struct.pack(">q", value)


class Collection(EncodedCollection):
    """Documents, codes and metadata of one collection, searchable exactly through its codec."""

    def __init__(self, folder: Path, *, encoder: Encoder | None = None, max_disk_bytes: int | None = None) -> None:
        """`max_disk_bytes`: a storage limit for the collection's store (documents, codes, index);
        a write that needs more fails with ResourceExhaustedError and changes nothing."""
        self.folder = folder
        self.config = CollectionConfig.from_json(read_json(folder / CONFIG_FILE))
        self.store = LmdbStore(folder / STORE_DIR, max_disk_bytes)
        self._finish_recode()
        self._generation = (self.store.get_meta(GENERATION) or b"").decode()
        self.codec = Codec.load(folder / _codec_dir(self._generation))
        if self.config.codec != self.codec.spec:  # a crash came right after a codec switch committed
            self._save_config(codec=self.codec.spec)
        self._encoder: Encoder | None = None
        if encoder is not None:
            self._attach_encoder(encoder)
        self._lock = ReadWriteLock()
        self._closed: str | None = None
        self._staging_codec = make_codec("fp32", self.config.dim)
        self.auto_fit = True  # a shard's codec is fitted once for the whole collection and handed in (adopt_codec)
        # opened up front: not possible inside a write
        self.postings = PostingStore(self.store.env, _postings_name(self._generation))
        codes_format = self.store.get_meta(CODES_FORMAT)
        if codes_format is None:
            codes_format = ENCODED if self.codec.fitted else STAGED
            self.store.write([], meta={CODES_FORMAT: codes_format})
        self._staged = codes_format == STAGED
        self._load_index()
        if self._staged and self.codec.fitted:  # a crash came between saving the fitted codec and re-encoding
            try:
                self._encode_staged()
            except ResourceExhaustedError:  # a full disk: open as staged (readable), fit again after a write
                log.warning("collection %r: re-encoding its staged vectors found the disk full", folder.name)
        self.lexical = open_lexical(folder / LEXICAL_DIR)
        self._lexical_unlogged: list[int] = []  # applied to the lexical index, not yet committed there
        self._lexical_committed_at, self._bulk_depth = time.monotonic(), 0
        self._lexical_behind = False  # a lexical write failed after its LMDB commit: replay from the log
        self._lexical_safely(self._catch_up_lexical)

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, name: str, *, encoder: Encoder | EncoderIdentity | None, dim: int | None,
               codec: str, index: str = "auto") -> Collection:
        """Write the config and (unfitted) codec into `folder`, which must not exist yet. An
        EncoderIdentity records the model without loading it (a shard is handed vectors only)."""
        if index not in INDEX_KINDS:
            raise invalid("index", f"must be one of {', '.join(INDEX_KINDS)}, got {index!r}")
        identity = encoder if isinstance(encoder, EncoderIdentity) else encoder.identity if encoder else None
        if identity is not None:
            if dim is not None and dim != identity.dim:
                raise invalid("dim", f"encoder {identity.model} makes {identity.dim}-d vectors, not {dim}")
            dim = identity.dim
        if dim is None or isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise invalid("dim", "a collection without an encoder needs a positive integer dim")
        spec = make_codec(codec, dim)
        config = CollectionConfig(name=name, dim=dim, codec=spec.spec, encoder=identity, index=index)
        spec.save(folder / CODEC_DIR)
        write_json(folder / CONFIG_FILE, config.to_json())
        return cls(folder, encoder=None if isinstance(encoder, EncoderIdentity) else encoder)

    def close(self, reason: str = "closed") -> None:
        if self._closed is None:
            with self._lock.write():
                self._lexical_safely(self._commit_lexical)
            self._closed = reason
            release_lexical(self.folder / LEXICAL_DIR)
            self.store.close()

    def _check_open(self) -> None:
        if self._closed is not None:
            raise NotFoundError(f"collection {self.name!r} was {self._closed}; open it again from its client")

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def staged(self) -> bool:
        """True while vectors are kept as float32 waiting for the codec to be fitted."""
        return self._staged

    def ids(self) -> list[str]:
        """Every stored id, in no particular order."""
        with self._lock.read():
            return list(self._row_of)

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
        self.spann: BufferedSpann | None = None
        self._deleted_since_purge = 0
        if self.store.get_meta(INDEX_KIND) == b"spann":
            self._load_spann()
            return
        keys, metadata, codes = self.store.load(self.scan_codec.bytes_per_vector)
        self._ids: list[str] = [k.decode() for k in keys]
        self._row_of: dict[str, int] = {key: row for row, key in enumerate(self._ids)}
        self.index.append(codes)
        self.metadata.append(metadata)

    def _meta_int(self, key: bytes) -> int:
        raw = self.store.get_meta(key)
        return 0 if raw is None else int(struct.unpack(">q", raw)[0])

    def _load_spann(self) -> None:
        """Ids and metadata into RAM; codes stay on disk except the unflushed buffer's."""
        keys, metadata, vids = self.store.load_keyed()
        next_vid, base = self._meta_int(NEXT_VID), self._meta_int(FLUSHED_UPTO)
        self._ids = [""] * next_vid
        metas: list[JSONDict] = [{} for _ in range(next_vid)]
        for key, meta, vid in zip(keys, metadata, vids.tolist(), strict=True):
            self._ids[vid] = key.decode()
            metas[vid] = meta
        self._row_of = {self._ids[vid]: vid for vid in vids.tolist()}
        self.metadata.append(metas)
        live = np.zeros(next_vid, dtype=bool)
        live[vids] = True
        self.metadata.remove(np.flatnonzero(~live))
        spann = SpannIndex.load(self.folder / INDEX_DIR, self.codec, self.postings)
        self.spann = BufferedSpann(spann, self.codec, base)
        pending = np.flatnonzero(live[base:])  # buffer rows still to flush
        codes = np.zeros((next_vid - base, self.codec.bytes_per_vector), dtype=np.uint8)
        codes[pending] = self.store.get_codes([self._ids[v].encode() for v in (pending + base).tolist()],
                                              self.codec.bytes_per_vector)
        self.spann.add(np.arange(base, next_vid), codes)
        self.spann.buffer.remove(np.flatnonzero(~live[base:]))

    # -- writes ------------------------------------------------------------------------------
    def upsert(self, ids: Sequence[IdLike], texts: Sequence[str | None] | None = None,
               vectors: Any = None, metadata: Sequence[JSONDict | None] | None = None, *,
               checkpoint: tuple[str, JSONDict] | None = None) -> int:
        """Insert or replace documents in one transaction; returns how many were written.

        `checkpoint` (name, state) is saved in that same transaction: a bulk job records how far
        it got, and after a crash the state read back from `jobs()` matches what was written."""
        self._check_open()
        job_meta = check_checkpoint(checkpoint)
        keys, texts, given, metas = check_upsert(ids, texts, vectors, metadata, self.config.dim)
        n = len(keys)
        vecs = given if given is not None else self.encoder.encode([t or "" for t in texts or []], kind="document")
        with self._lock.write():
            codes = self.scan_codec.encode(vecs)
            rescore = self.codec.rescore.encode(vecs) if self.codec.rescore and not self._staged else None
            first = len(self._ids)
            keep_vids = self.spann is not None
            puts = [
                Put(key.encode(),
                    json.dumps({"text": texts[i] if texts is not None else None, "metadata": metas[i]}).encode(),
                    codes[i].tobytes(), None if rescore is None else rescore[i].tobytes(),
                    first + i if keep_vids else None)
                for i, key in enumerate(keys)
            ]
            replaced = [k for k in keys if k in self._row_of]
            index_write, apply = self._stage_removal(replaced)
            meta = {NEXT_VID: _pack(first + n)} if keep_vids else {}
            sequence, logged = self._lexical_log(keys)
            self.store.write(puts, meta={**meta, **job_meta, **logged}, index=index_write)
            # Committed: RAM follows now, before anything that can fail (the lexical index, housekeeping).
            apply()
            self._forget(replaced)
            vids = np.arange(first, first + n)
            if self.spann is not None:
                self.spann.add(vids, codes)
            elif not np.array_equal(self.index.append(codes), vids):
                raise RuntimeError("flat index rows and collection ids are out of step")
            self.metadata.append(metas)
            self._ids.extend(keys)
            self._row_of.update(zip(keys, vids.tolist(), strict=True))
            self._apply_lexical(sequence, [(key, texts[i] if texts is not None else None)
                                           for i, key in enumerate(keys)], [])
            self._after_write()
        return n

    def upsert_stream(self, batches: Iterable[UpsertBatch]) -> Iterator[int]:
        """Each batch in its own transaction (with its checkpoint), yielding how many it wrote as it
        commits; once the stream ends the write buffer is flushed, so a bulk load is fully indexed.
        A bad batch raises and leaves the ones before it committed (as over gRPC); a lexical search
        sees every batch acknowledged before it."""
        with self.bulk():
            for batch in batches:
                yield self.upsert(batch.ids, texts=batch.texts, vectors=batch.vectors, metadata=batch.metadata,
                                  checkpoint=batch.checkpoint)
        self.flush_index()

    @contextlib.contextmanager
    def bulk(self) -> Iterator[None]:
        """Writes inside are a bulk load: at the end everything is committed to the lexical index
        and its merges finish."""
        self._bulk_depth += 1
        try:
            yield
        finally:
            self._bulk_depth -= 1
            with self._lock.write():
                self._lexical_safely(self._commit_lexical)
                if not self._bulk_depth:
                    self._lexical_safely(self.lexical.settle)

    def _stage_removal(self, keys: Sequence[str]) -> tuple[Callable[[lmdb.Transaction], None] | None,
                                                            Callable[[], None]]:
        """The index's part of removing `keys` (SPANN tombstones), to run inside the store's transaction."""
        spann = self.spann
        if spann is None or not keys:
            return None, lambda: None
        vids = np.array([self._row_of[k] for k in keys], dtype=np.int64)
        staged: list[Callable[[], None]] = []

        def write(txn: lmdb.Transaction) -> None:
            staged[:] = [spann.stage_remove(txn, vids)]

        def apply() -> None:
            staged[0]()
            self._deleted_since_purge += len(vids)

        return write, apply

    def _after_write(self) -> None:
        """Housekeeping after a committed write: fit the codec, choose or rebuild the index, flush.

        The write itself has committed: maintenance that fails (a full disk) is rolled back, logged
        and tried again after the next write, never reported as a failed write (a flat collection's
        codec fit or first SPANN build on a full disk failed the upsert that had just committed)."""
        try:
            if self.spann is None:
                self._maybe_compact()
                if self._staged and self.auto_fit and self.count() >= self.fit_threshold:
                    self._fit_locked(self._staging_codec.decode(self.index.codes()[self.index.live[: self.index.rows]]))
                if self._wants_spann():
                    self._build_spann()
                return
            if self.spann.buffer.rows >= FLUSH_ROWS:
                self._flush()
            if self._deleted_since_purge > PURGE_FRACTION * max(self.count(), 1):
                self._purge()
        except ResourceExhaustedError as err:
            log.warning("collection %r: index maintenance postponed, the data is safe: %s", self.name, err)
        except Exception:
            log.exception("collection %r: index maintenance failed; the data is safe and it will be retried",
                          self.name)

    def _wants_spann(self) -> bool:
        if self.spann is not None or self._staged or not self.codec.fitted:
            return False
        kind, n = self.config.index, self.count()
        return (kind == "spann" and n >= FIT_THRESHOLD) or (kind == "auto" and n >= SPANN_AUTO_MIN)

    def _build_spann(self) -> None:
        """Cluster all live vectors into a fresh SPANN index, in one transaction (first build or
        rebuild). Codes are read as the build needs them (a sample, a chunk, one list at a time)
        and only those are decoded to float32, so a large collection builds in bounded memory."""
        first_build = self.spann is None
        if first_build:  # flat rows become vids: compact so they are 0..n-1
            self._compact_rows()
            vids = np.arange(len(self._ids))
            flat_codes = self.index.codes()

            def read_codes(rows: np.ndarray) -> np.ndarray:
                return flat_codes[rows]
        else:
            vids = np.array(sorted(self._row_of.values()), dtype=np.int64)
            keys = [self._ids[v].encode() for v in vids.tolist()]

            def read_codes(rows: np.ndarray) -> np.ndarray:
                return self.store.get_codes([keys[r] for r in rows.tolist()], self.codec.bytes_per_vector)
        next_vid = len(self._ids)
        config = SpannConfig()
        folder = self.folder / INDEX_DIR
        built: list[SpannIndex] = []

        def write(txn: lmdb.Transaction) -> None:
            built[:] = [SpannIndex.build_from(vids, lambda rows: self.codec.reconstruct(read_codes(rows)), read_codes,
                                              self.codec, self.postings, config, txn=txn)]

        SpannIndex.save_config(config, folder)
        self.store.reserve(8 * len(vids) * (self.codec.bytes_per_vector + 8) * (1 + config.replicas) + (16 << 20))
        meta = {INDEX_KIND: b"spann", NEXT_VID: _pack(next_vid), FLUSHED_UPTO: _pack(next_vid),
                BUILT_COUNT: _pack(len(vids))}
        if first_build:
            self.store.set_vids([self._ids[v].encode() for v in vids.tolist()], vids, meta, write)
        else:
            self.store.transact(write, meta)
        self.spann = BufferedSpann(built[0], self.codec, next_vid)
        self.index = FlatIndex(self.codec)  # the flat copy of every code is no longer needed
        self._deleted_since_purge = 0
        trim_heap()

    def flush_index(self) -> None:
        """Move the write buffer into the posting lists now (the end of a bulk load); no-op for flat."""
        self._check_open()
        with self._lock.write():
            if self.spann is not None and self.spann.buffer.rows:
                self._flush()

    def rebuild_index(self) -> None:
        """Re-cluster the SPANN index from all live vectors now (what a growing collection does by
        itself each time it doubles): lists balanced afresh, tombstones and the write buffer gone."""
        self._check_open()
        if self.config.index == "flat":
            raise FailedPreconditionError(f"collection {self.name!r} uses the flat index; it has nothing to rebuild")
        with self._lock.write():
            if self._staged or not self.codec.fitted or self.count() < 2:
                raise FailedPreconditionError(
                    f"collection {self.name!r} needs a fitted codec and at least 2 vectors before an index is built")
            self._build_spann()

    def _flush(self) -> None:
        """Write buffer -> posting lists, in one transaction; rebuild once the collection has doubled."""
        spann = self.spann
        assert spann is not None
        self._commit_index(spann.stage_flush, {FLUSHED_UPTO: _pack(spann.next_vid)})
        if self.count() >= REBUILD_GROWTH * max(self._meta_int(BUILT_COUNT), 1):
            self._build_spann()

    def _purge(self) -> None:
        """Rewrite the lists that hold tombstones; merge the ones left small."""
        assert self.spann is not None
        self._commit_index(self.spann.spann.stage_purge)
        self._deleted_since_purge = 0

    def _commit_index(self, stage: Callable[[lmdb.Transaction], Callable[[], None]],
                      meta: dict[bytes, bytes] | None = None) -> None:
        """Run an index change in one transaction of its own, then swap its in-RAM state in."""
        staged: list[Callable[[], None]] = []

        def write(txn: lmdb.Transaction) -> None:
            staged[:] = [stage(txn)]

        self.store.transact(write, meta)
        staged[0]()
        trim_heap()

    def fit_codec(self, sample: Any) -> None:
        """Fit the codec on a representative sample now (while its vectors are still staged or none exist)."""
        self._check_open()
        vecs = check_vectors(sample, self.config.dim, "sample")
        with self._lock.write():
            if not self._staged and self.count() > 0:
                raise FailedPreconditionError(f"collection {self.name!r} already holds codes; its codec is fixed")
            self._fit_locked(vecs)

    def adopt_codec(self, codec: Codec) -> None:
        """Take a codec fitted elsewhere (one shared by every shard of a collection, so their scores
        compare) and re-encode the staged vectors with it."""
        self._check_open()
        if not codec.fitted or codec.spec != self.codec.spec or codec.dim != self.config.dim:
            raise invalid("codec", f"must be a fitted {self.codec.spec!r} codec of {self.config.dim} dims")
        with self._lock.write():
            if not self._staged:
                raise FailedPreconditionError(f"collection {self.name!r} already holds codes; its codec is fixed")
            self.codec = codec
            self._encode_staged()
            if self._wants_spann():
                self._build_spann()

    def _fit_locked(self, sample: np.ndarray) -> None:
        """Fit once, then freeze: codes are never re-calibrated per batch."""
        self.codec.fit(sample)
        if self._staged:
            self._encode_staged()
        else:
            self.codec.save(self.folder / _codec_dir(self._generation))

    def _encode_staged(self) -> None:
        """Re-encode the staged float32 vectors with the fitted codec.

        The codec is saved first; the codes and the format flag then change in one LMDB
        transaction. A crash in between is finished on the next open.
        """
        self._compact_rows()
        vectors = self._staging_codec.decode(self.index.codes())
        codes = self.codec.encode(vectors)
        rescore = self.codec.rescore.encode(vectors) if self.codec.rescore else None
        self.codec.save(self.folder / _codec_dir(self._generation))
        self.store.rewrite_codes([k.encode() for k in self._ids], codes, rescore, {CODES_FORMAT: ENCODED})
        self._staged = False
        self.index = FlatIndex(self.codec)
        self.index.append(codes)

    def delete(self, ids: Sequence[IdLike], *, checkpoint: tuple[str, JSONDict] | None = None) -> int:
        """Remove documents in one transaction; unknown ids are ignored. Returns how many existed.
        `checkpoint` is saved in that transaction, as in upsert (even when nothing was there)."""
        self._check_open()
        job_meta = check_checkpoint(checkpoint)
        keys = check_ids(ids)
        with self._lock.write():
            present = [k for k in keys if k in self._row_of]
            if present:
                index_write, apply = self._stage_removal(present)
                sequence, logged = self._lexical_log(present)
                self.store.write([], [k.encode() for k in present], meta={**logged, **job_meta}, index=index_write)
                apply()
                self._forget(present)
                self._apply_lexical(sequence, [], present)
                self._after_write()
            elif job_meta:
                self.store.write([], meta=job_meta)
        return len(present)

    def _forget(self, keys: Sequence[str]) -> None:
        """In RAM, after the commit (a SPANN index drops its own copies in its `apply`)."""
        rows = np.array([self._row_of.pop(k) for k in keys], dtype=np.int64)
        if len(rows):
            if self.spann is None:
                self.index.remove(rows)
            self.metadata.remove(rows)

    def _maybe_compact(self) -> None:
        dead = self.index.tombstones
        if dead > 1024 and dead * 2 > self.index.rows:
            self._compact_rows()

    def _compact_rows(self) -> None:
        """Flat index only: drop deleted rows and renumber (SPANN vids are never renumbered)."""
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
        keys = check_ids(ids)
        out: list[Record | None] = []
        for key, raw in zip(keys, self.store.get_documents([k.encode() for k in keys]), strict=True):
            doc = None if raw is None else json.loads(raw)
            out.append(None if doc is None else Record(key, doc["text"], doc["metadata"]))
        return out

    def search(self, query: QueryLike, k: int = 10, filter: JSONDict | None = None, *,
               vector: Sequence[float] | np.ndarray | None = None, model: str | None = None,
               rescore_candidates: int | None = None, nprobe: int | None = None, mode: str = DEFAULT_MODE,
               fusion: str = DEFAULT_FUSION, rrf_k: int = DEFAULT_RRF_K, alpha: float = DEFAULT_ALPHA,
               with_vectors: bool = False, allow_partial: bool = False) -> list[Hit]:
        """Top-k hits for one query text or vector (see `search_batch`)."""
        if not isinstance(query, str) and np.asarray(query).ndim != 1:
            raise invalid("query", "must be one text or one vector; use search_batch for several")
        if vector is not None and np.asarray(vector).ndim != 1:
            raise invalid("vector", "must be one vector")
        return self.search_batch([query] if isinstance(query, str) else np.asarray(query)[None, :], k, filter,
                                 vectors=None if vector is None else np.asarray(vector)[None, :], model=model,
                                 rescore_candidates=rescore_candidates, nprobe=nprobe, mode=mode,
                                 fusion=fusion, rrf_k=rrf_k, alpha=alpha, with_vectors=with_vectors)[0]

    def search_batch(self, queries: Sequence[str] | np.ndarray | Sequence[Sequence[float]], k: int = 10,
                     filter: JSONDict | None = None, *, vectors: np.ndarray | Sequence[Sequence[float]] | None = None,
                     model: str | None = None, rescore_candidates: int | None = None, nprobe: int | None = None,
                     mode: str = DEFAULT_MODE, fusion: str = DEFAULT_FUSION, rrf_k: int = DEFAULT_RRF_K,
                     alpha: float = DEFAULT_ALPHA, with_vectors: bool = False,
                     allow_partial: bool = False) -> list[list[Hit]]:
        """Top-k hits per query. `nprobe` bounds the posting lists a SPANN index reads per query
        (more: higher recall, slower); the flat index ignores it. `mode`: "dense" (vectors),
        "lexical" (BM25 over the texts) or "hybrid" (both; `fusion` "weighted": min-max normalised
        scores, `alpha` on the dense side, or "rrf": reciprocal rank with `rrf_k`). Text queries
        are encoded with the collection's encoder unless `vectors` gives their dense side (a
        collection of caller-made vectors searched in hybrid mode). `with_vectors`: each hit
        carries its stored vector, decoded from its codes (so approximate under a lossy codec).
        `allow_partial` matters only to sharded collections (a local one is never partial)."""
        self._check_open()
        k = check_k(k)
        nprobe = check_nprobe(nprobe)
        check_fusion(mode, fusion, rrf_k, alpha)
        if not len(queries):
            raise invalid("queries", "empty batch")
        texts = isinstance(queries, Sequence) and all(isinstance(q, str) for q in queries)
        if mode != "dense" and not texts:
            raise invalid("query", f"{mode} search needs query text, not vectors")
        if vectors is not None and not texts:
            raise invalid("vectors", "go with query texts (their dense side); give vectors as the queries instead")
        if vectors is not None and len(vectors) != len(queries):
            raise invalid("vectors", f"one per query: {len(queries)} queries, {len(vectors)} vectors")
        depth = k if mode == "dense" else max(k, FUSION_DEPTH)
        with self._lock.read():
            allowed = self.metadata.evaluate(filter)
        dense: list[list[tuple[str, float]]] | None = None
        lexical: list[list[tuple[str, float]]] | None = None
        if mode != "lexical":
            query_vectors = self.embed_queries(queries if vectors is None else vectors, model)
            with self._lock.read():
                scores, rows = self.search_vectors(query_vectors, depth, allowed, rescore_candidates, nprobe)
                dense = [[(self._ids[r], s) for r, s in zip(row, row_scores, strict=True) if r >= 0]
                         for row, row_scores in zip(rows.tolist(), scores.tolist(), strict=True)]
        if mode != "dense":
            self._publish_lexical()
            lexical = [self._lexical_top(str(q), depth, allowed) for q in queries]
        ranked = [fuse(dense[i] if dense else None, lexical[i] if lexical else None, mode, fusion, rrf_k, alpha, k)
                  for i in range(len(queries))]
        flat_ids = sorted({hit.id for row in ranked for hit in row})
        docs = dict(zip(flat_ids, self.store.get_documents([i.encode() for i in flat_ids]), strict=True))
        stored = self.stored_vectors(flat_ids) if with_vectors else {}
        out = []
        for row in ranked:
            hits = []
            for hit in row:
                doc = json.loads(docs[hit.id] or b"{}")
                hits.append(Hit(hit.id, hit.score, doc.get("text"), doc.get("metadata", {}), hit.dense_score,
                                hit.dense_rank, hit.lexical_score, hit.lexical_rank, stored.get(hit.id)))
            out.append(hits)
        return out

    def stored_vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Input-space vectors of `ids`, reconstructed from their stored codes."""
        if not ids:
            return {}
        codec = self.scan_codec
        codes = self.store.get_codes([i.encode() for i in ids], codec.bytes_per_vector, bulk=False)
        return dict(zip(ids, codec.reconstruct(codes), strict=True))

    def _lexical_top(self, query: str, depth: int, allowed: np.ndarray | None) -> list[tuple[str, float]]:
        def passes(ids: list[str]) -> np.ndarray:
            assert allowed is not None
            with self._lock.read():
                rows = [self._row_of.get(i, -1) for i in ids]
            return np.array([r >= 0 and bool(allowed[r]) for r in rows], dtype=bool)

        ids, scores = self.lexical.search(query, depth, None if allowed is None else passes)
        return list(zip(ids, scores.tolist(), strict=True))

    def search_vectors(self, vectors: np.ndarray, k: int, allowed: np.ndarray | None = None,
                       rescore_candidates: int | None = None,
                       nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Arrays in, arrays out: (scores, rows) [nq, k], rows padded with -1."""
        if self.codec.rescore is None or self._staged:
            return self._candidates(vectors, k, allowed, nprobe)
        wide = max(k, rescore_candidates or DEFAULT_RESCORE_FACTOR * k)
        _, rows = self._candidates(vectors, wide, allowed, nprobe)
        return self._rescore(vectors, rows, k)

    def _candidates(self, vectors: np.ndarray, k: int, allowed: np.ndarray | None,
                    nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        if self.spann is None:
            return self.index.search(vectors, k, allowed)
        if allowed is None:
            return self.spann.search(vectors, k, nprobe=nprobe)
        allowed = allowed & self.metadata.present()
        passing = int(np.count_nonzero(allowed))
        if passing <= max(FILTER_SCAN_MAX, FILTER_SCAN_SHARE * self.count()):
            return self._scan_rows(vectors, k, np.flatnonzero(allowed))
        # Probe more lists, as fewer of each list's vectors pass: recall holds at a bounded cost.
        widen = min(MAX_FILTER_WIDEN, int(np.ceil(self.count() / passing)))
        config = self.spann.spann.config
        return self.spann.search(vectors, k, allowed, (nprobe or config.nprobe) * widen)  # eps2 widens with it

    def _scan_rows(self, vectors: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact scan of just these rows' codes, read from the store (a selective filter)."""
        if not len(rows):
            return rerank(np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64), k)
        codes = self.store.get_codes([self._ids[r].encode() for r in rows.tolist()], self.codec.bytes_per_vector,
                                     bulk=False)
        scores = self.codec.scores(vectors, codes)
        return rerank(scores, np.broadcast_to(rows, scores.shape), k)

    def _rescore(self, vectors: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-rank candidates with the higher-precision codes kept on disk (read only for candidates)."""
        assert self.codec.rescore is not None
        refiner = self.codec.rescore
        valid = rows >= 0
        keys = [self._ids[r].encode() for r in rows[valid].tolist()]
        codes = np.zeros((*rows.shape, refiner.bytes_per_vector), dtype=np.uint8)
        codes[valid] = self.store.get_rescore_codes(keys, refiner.bytes_per_vector)
        return rerank(refiner.candidate_scores(vectors, codes), rows, k)

    def _index_info(self) -> JSONDict:
        if self.spann is None:
            return {"kind": "flat", "setting": self.config.index}
        spann = self.spann.spann
        return {"kind": "spann", "setting": self.config.index, "lists": spann.centroids.live_count,
                "buffered": self.spann.buffered, "tombstones": len(spann.tombstones),
                "built_count": self._meta_int(BUILT_COUNT), **spann.config.to_json()}

    def jobs(self) -> dict[str, JSONDict]:
        """The last checkpoint of each job that wrote with one (see upsert), by job name."""
        self._check_open()
        return {key[len(JOB_PREFIX):].decode(): json.loads(value) for key, value in self.store.meta_items(JOB_PREFIX)}

    # -- the lexical index ---------------------------------------------------------------------
    def _lexical_log(self, keys: Sequence[str]) -> tuple[int, dict[bytes, bytes]]:
        """The next sequence number and the meta entries that log `keys` under it (written in the
        batch's own transaction)."""
        sequence = self._meta_int(LEXICAL_SEQ) + 1
        return sequence, {LEXICAL_SEQ: _pack(sequence), LEXICAL_LOG + _pack(sequence): json.dumps(list(keys)).encode()}

    def _apply_lexical(self, sequence: int, upserts: Sequence[tuple[str, str | None]], deletes: Sequence[str]) -> None:
        """After the LMDB commit: the same change staged in the lexical index; the commit, which
        also drops the log entries it covers, waits up to LEXICAL_COMMIT_S or until a lexical
        search (`_publish_lexical`). A tantivy commit costs ~16-37 ms: one per 512-document batch
        halved ingest speed, and one per small write (soak: 20 writes/s) held the searches back
        under the write lock until their p50 went from 5 ms to seconds. Never raises (see
        `_lexical_safely`); once behind, the log replay brings this batch in with the others."""
        if self._lexical_behind:
            self._lexical_safely(self._catch_up_lexical)
            return

        def step() -> None:
            self.lexical.stage(upserts, deletes)
            self._lexical_unlogged.append(sequence)
            if time.monotonic() - self._lexical_committed_at >= LEXICAL_COMMIT_S:
                self._commit_lexical()

        self._lexical_safely(step)

    def _publish_lexical(self) -> None:
        """Commit what writes have staged, so a lexical search sees every acknowledged write."""
        if self._lexical_unlogged:
            with self._lock.write():
                self._lexical_safely(self._commit_lexical)

    def _lexical_safely(self, step: Callable[[], None]) -> None:
        """Run a lexical-index step that follows an LMDB commit. When it fails (a full disk kills
        tantivy's writer) the committed write stands: the index drops what it had staged and is
        marked behind; the batches stay in the LMDB log and are replayed before the next write, or
        on the next open. Until then lexical search misses them."""
        try:
            step()
        except Exception:
            log.warning("collection %r: the lexical index could not be written; it catches up from the log "
                        "at the next write", self.name, exc_info=True)
            self.lexical.discard()
            self._lexical_unlogged.clear()
            self._lexical_behind = True

    def _commit_lexical(self) -> None:
        if not self._lexical_unlogged:
            return
        self.lexical.commit(self._lexical_unlogged[-1])
        self.store.delete_meta([LEXICAL_LOG + _pack(seq) for seq in self._lexical_unlogged])
        self._lexical_unlogged.clear()
        self._lexical_committed_at = time.monotonic()

    def _catch_up_lexical(self) -> None:
        """Replay the logged batches the lexical index has not applied (a crash between the two
        commits), or index every document when the lexical index is new."""
        current = self._meta_int(LEXICAL_SEQ)
        logged = self.store.meta_items(LEXICAL_LOG)
        if self.lexical.applied >= current and not logged:
            self._lexical_behind = False
            return
        if self.lexical.applied < 0:  # new (or lost): from the documents themselves
            keys = list(self._row_of)
        else:
            keys = list(dict.fromkeys(key for raw_seq, raw in logged
                                      if struct.unpack(">q", raw_seq[len(LEXICAL_LOG):])[0] > self.lexical.applied
                                      for key in json.loads(raw)))
        for lo in range(0, len(keys), 4096):
            part = keys[lo:lo + 4096]
            docs = self.store.get_documents([k.encode() for k in part])
            self.lexical.stage([(k, json.loads(d).get("text")) for k, d in zip(part, docs, strict=True) if d],
                               [k for k, d in zip(part, docs, strict=True) if not d])
        self.lexical.commit(current)
        self._lexical_behind = False
        self.store.delete_meta([key for key, _ in logged])

    def recode(self, spec: str, *, progress: bool = True) -> JSONDict:
        """Re-encode every stored code with a new codec (`nestvec plan --apply`).

        The new codec is fitted on the collection's float vectors (kept float rescoring codes,
        else the texts encoded again, else the current codes decoded) and its codes and posting
        lists are written beside the live ones; one transaction then switches codes, codec and
        lists together. Searches run on the old codec until that transaction and the in-RAM swap,
        which hold them back briefly; other writers wait for the whole switch. A crash leaves the
        old codec or the new one, never a mix: the next open removes the other's files."""
        self._check_open()
        new_codec = make_codec(spec, self.config.dim)  # a bad spec fails here, before anything
        started = time.perf_counter()
        with self._lock.exclusive():
            with self._lock.readers_out():  # the change starts from posting lists with no write buffer
                if self.spann is not None and self.spann.buffer.rows:
                    self._flush()
                if self.spann is None:
                    self._compact_rows()
            vids = (np.array(sorted(self._row_of.values()), dtype=np.int64) if self.spann is not None
                    else np.arange(len(self._ids), dtype=np.int64))
            if len(vids) < new_codec.min_fit_size or len(vids) < 2:
                raise FailedPreconditionError(f"collection {self.name!r} holds {len(vids)} vectors; {new_codec.spec} "
                                              f"needs at least {max(new_codec.min_fit_size, 2)} to fit")
            ids = [self._ids[v] for v in vids.tolist()]
            vectors, source = self._float_vectors(ids, progress)
            old, token = self._generation, "g" + secrets.token_hex(4)
            self.store.write([], meta={RECODE_PENDING: token.encode()})
            try:
                fit_rows = np.sort(np.random.default_rng(0).choice(len(vectors), min(RECODE_FIT_SAMPLE, len(vectors)),
                                                                   replace=False))
                new_codec.fit(vectors[fit_rows])
                new_codec.save(self.folder / _codec_dir(token))
                codes = new_codec.encode(vectors)
                rescore = new_codec.rescore.encode(vectors) if new_codec.rescore is not None else None
                postings = PostingStore(self.store.env, _postings_name(token))
                built = None
                if self.spann is not None:
                    built = SpannIndex.build_from(vids, lambda rows: vectors[rows], lambda rows: codes[rows],
                                                  new_codec, postings, self.spann.spann.config)
            except BaseException:
                self._remove_generation(token)
                self.store.delete_meta([RECODE_PENDING])
                raise
            next_vid = len(self._ids)
            meta = {GENERATION: token.encode(), RECODE_RETIRED: old.encode(), CODES_FORMAT: ENCODED}
            if built is not None:
                meta |= {NEXT_VID: _pack(next_vid), FLUSHED_UPTO: _pack(next_vid), BUILT_COUNT: _pack(len(vids))}
            with self._lock.readers_out():
                self.store.rewrite_codes([k.encode() for k in ids], codes, rescore, meta, drop_meta=[RECODE_PENDING])
                self.codec, self._generation, self.postings, self._staged = new_codec, token, postings, False
                self.index = FlatIndex(new_codec)
                if built is not None:
                    self.spann = BufferedSpann(built, new_codec, next_vid)
                else:
                    self.index.append(codes)
                self._deleted_since_purge = 0
                self._save_config(codec=new_codec.spec)
            self._finish_recode()  # the old generation's codec folder and posting lists
            trim_heap()
        return {"collection": self.name, "codec": new_codec.spec, "vectors": len(ids), "from": source,
                "seconds": round(time.perf_counter() - started, 2),
                "bytes_per_vector": new_codec.bytes_per_vector}

    def _finish_recode(self) -> None:
        """Remove what a codec switch left behind: the new generation's files when it did not
        commit (RECODE_PENDING), the old one's when it did (RECODE_RETIRED)."""
        for key in (RECODE_PENDING, RECODE_RETIRED):
            token = self.store.get_meta(key)
            if token is not None:
                self._remove_generation(token.decode())
                self.store.delete_meta([key])

    def _remove_generation(self, token: str) -> None:
        shutil.rmtree(self.folder / _codec_dir(token), ignore_errors=True)
        PostingStore(self.store.env, _postings_name(token)).drop()

    def _save_config(self, **changes: Any) -> None:
        self.config = dataclasses.replace(self.config, **changes)
        write_json(self.folder / CONFIG_FILE, self.config.to_json())

    def _float_vectors(self, ids: Sequence[str], progress: bool) -> tuple[np.ndarray, str]:
        """The most faithful float vectors of `ids` there are, and where they came from."""
        refiner = self.codec.rescore
        if refiner is not None and refiner.spec in ("fp32", "fp16") and not self._staged:
            codes = self.store.get_rescore_codes([k.encode() for k in ids], refiner.bytes_per_vector)
            return refiner.reconstruct(codes), f"kept {refiner.spec} rescoring vectors"
        if self.config.encoder is not None and not self._staged:
            texts = [r.text or "" if r is not None else "" for r in self.get(ids)]
            vectors = self.encoder.encode(texts, kind="document", show_progress=progress)
            return vectors, f"texts encoded again with {self.config.encoder.model}"
        codes = self.store.get_codes([k.encode() for k in ids], self.scan_codec.bytes_per_vector)
        exact = self._staged or self.scan_codec.spec == "fp32"
        return self.scan_codec.reconstruct(codes), ("stored fp32 vectors" if exact else
                                                    f"decoded {self.scan_codec.spec} codes (no float copy kept)")

    def plan_sample(self, size: int, include: Sequence[str] = (), seed: int = 0,
                    progress: bool = True) -> tuple[list[str], np.ndarray, str]:
        """(ids, float32 vectors, where they came from) of `size` documents (those in `include`
        first, then random others) for the compression planner. The most faithful vectors there
        are: the kept rescoring codes when they are float, else the texts encoded again, else (a
        collection of raw vectors) the codes decoded, which measures codecs relative to the current one."""
        self._check_open()
        if size < 1:
            raise invalid("sample", f"must be >= 1, got {size}")
        with self._lock.read():
            live = [key for key in self._ids if key in self._row_of]
        chosen = list(dict.fromkeys(k for k in include if k in self._row_of))
        rest = np.setdiff1d(np.array(live, dtype=object), np.array(chosen, dtype=object))
        take = max(0, min(size - len(chosen), len(rest)))
        ids = chosen + sorted(np.random.default_rng(seed).choice(rest, take, replace=False).tolist())
        vectors, source = self._float_vectors(ids, progress)
        return ids, vectors, source

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
            "index": self._index_info(),
            "disk_bytes": self.store.disk_bytes() + self.lexical.disk_bytes(),
            "lexical_behind": self._lexical_behind,
            "jobs": self.jobs(),
        }


