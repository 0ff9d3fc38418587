"""LMDB storage of one collection: documents, codes, rescoring codes and index ids, keyed by id.

One write transaction per batch covers all of them, and the vector index's own databases (posting
lists, centroids, tombstones) live in the same environment and join that transaction, so a batch
lands whole or not at all. One Environment per path per process (LMDB forbids opening the same
file twice). Readahead is off: index reads are random, and under a memory cap the kernel's
readahead evicts pages a query still needs.

LMDB writes through its map (writemap: dirty pages are not copied into the heap). A page of the
map that is a hole in a sparse file gets its disk block when first written, and on a full disk
that write killed the process with SIGBUS (a full 8 MB tmpfs under an upsert). So the map never
reaches past blocks the file really has: before it grows, the file is allocated up to the new
size (posix_fallocate), and a full disk is a ResourceExhaustedError before any page is touched.
The cost: the file holds its whole map on disk, up to twice what is in use (the map doubles, by
at most MAX_GROWTH at a time). `max_bytes` caps the map: a storage limit for the collection.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import lmdb
import numpy as np

from nestvec.concurrency import PerPath, ReadWriteLock
from nestvec.errors import ResourceExhaustedError
from nestvec.fsutil import out_of_space, preallocate
from nestvec.memory import mapped_file
from nestvec.types import JSONDict

INITIAL_MAP_SIZE = 2 << 20  # allocated on disk (see above), so small: an empty collection costs 2 MB
MAX_GROWTH = 1 << 30  # the map doubles, by at most this much at a time
MIN_GROWTH = 1 << 20  # on a nearly full disk, by as little as this
LOCK_FILE_BYTES = 8192  # LMDB's lock file for its default 126 readers; written through a map as well
PAGE_BYTES = 4096
LOW_SPACE_BYTES = 1 << 20
BULK_READ = 2048  # keys read by key between checks on the pages mapped
IndexWrite = Callable[[lmdb.Transaction], None]


class StoreEnv:
    """One LMDB environment and the locks all its users in this process share.

    The map is resized only while no transaction of this process is open: py-lmdb invalidates the
    open ones on a resize (a search reading documents beside an upsert that grew the map failed
    with "Attempt to operate on closed/deleted/dropped object"), and a buffer read from the old map
    would point into unmapped memory. Every transaction holds `_txns` shared, a resize alone; a
    resize happens only under `write_lock`, which also keeps writers that may resize one at a time."""

    def __init__(self, raw: lmdb.Environment, folder: Path) -> None:
        self.raw, self.folder = raw, folder
        self.write_lock = threading.Lock()
        self._txns = ReadWriteLock()

    def __getattr__(self, name: str) -> Any:  # open_db, info, stat, path, close: the environment's own
        return getattr(self.raw, name)

    @overload
    def begin(self, *, write: bool = ..., buffers: Literal[False] = ...
              ) -> contextlib.AbstractContextManager[lmdb.Transaction[bytes]]: ...

    @overload
    def begin(self, *, write: bool = ..., buffers: Literal[True]
              ) -> contextlib.AbstractContextManager[lmdb.Transaction[memoryview]]: ...

    def begin(self, *, write: bool = False, buffers: bool = False) -> contextlib.AbstractContextManager[Any]:
        return self._begin(write, buffers)

    @contextlib.contextmanager
    def _begin(self, write: bool, buffers: bool) -> Iterator[Any]:
        with self._txns.read():
            txn = self.raw.begin(write=write, buffers=True) if buffers else self.raw.begin(write=write)
            with txn:
                yield txn

    @property
    def map_size(self) -> int:
        return int(self.raw.info()["map_size"])

    def resize(self, size: int, what: str) -> None:
        """Allocate the data file up to `size` bytes, then map that much (call under `write_lock`)."""
        preallocate(self.folder / "data.mdb", size, what)
        with self._txns.write():
            self.raw.set_mapsize(size)


def _open_lmdb(path: Path) -> StoreEnv:
    path.mkdir(parents=True, exist_ok=True)
    data, lock = path / "data.mdb", path / "lock.mdb"
    if not lock.exists():
        preallocate(lock, LOCK_FILE_BYTES, "a new store's lock file")
    size = max(INITIAL_MAP_SIZE, data.stat().st_size if data.exists() else 0)  # the map it had, or a first one
    try:
        raw = lmdb.open(str(path.resolve()), map_size=size, max_dbs=16, subdir=True, lock=True, readahead=False,
                        writemap=True)
    except lmdb.Error as err:  # a new file's first pages are written with write(2): ENOSPC comes back as EIO
        if _low_space(path):
            raise out_of_space(data, "a new store") from err
        raise
    env = StoreEnv(raw, path)
    try:
        preallocate(data, env.map_size, "the store's map")
    except ResourceExhaustedError:
        if raw.info()["last_txnid"] == 0:  # a new store: its databases could not even be created
            raw.close()
            raise
        raw.set_mapsize(PAGE_BYTES)  # down to the pages in use (all written): writes ask for space again
    return env


def _low_space(path: Path) -> bool:
    """Whether an LMDB error (which names EIO, not ENOSPC, for a short write) came from a full disk."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < LOW_SPACE_BYTES


_ENVS: PerPath[StoreEnv] = PerPath(_open_lmdb, lambda env: env.close())
_open_env, _release_env = _ENVS.acquire, _ENVS.release


@dataclass(frozen=True)
class Put:
    key: bytes
    document: bytes
    code: bytes
    rescore: bytes | None = None
    vid: int | None = None  # the vector index's id for this key, when the index needs one kept


class LmdbStore:
    def __init__(self, path: Path, max_bytes: int | None = None) -> None:
        """`max_bytes`: the most the store's file may take on disk (None: what the disk has)."""
        self.path, self.max_bytes = path, max_bytes
        self.env = _open_env(path)
        self._docs = self.env.open_db(b"docs")
        self._codes = self.env.open_db(b"codes")
        self._rescore = self.env.open_db(b"rescore")
        self._meta = self.env.open_db(b"meta")
        self._vids = self.env.open_db(b"vids")
        self.pages = mapped_file(path / "data.mdb")  # what bulk writes leave mapped is released as they go

    def close(self) -> None:
        _release_env(self.path)

    def _transact(self, body: Callable[[lmdb.Transaction], None]) -> None:
        """Run `body` in one write transaction; on a full map, grow it and run again from scratch.
        Nothing is left changed when there is no room: the transaction aborts, then this raises."""
        with self.env.write_lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        body(txn)
                    return
                except lmdb.MapFullError:
                    self._grow(self.env.map_size + 1)
                except lmdb.Error as err:  # with the map allocated, a full disk should not get here
                    if _low_space(self.path):
                        raise out_of_space(self.path / "data.mdb", "a write transaction") from err
                    raise

    def _grow(self, needed: int) -> None:
        """A map of at least `needed` bytes (doubling, by at most MAX_GROWTH), within `max_bytes`."""
        size = self.env.map_size
        target = size
        while target < needed:
            target += min(target, MAX_GROWTH)
        if self.max_bytes is not None and target > self.max_bytes:
            if size >= self.max_bytes:
                raise ResourceExhaustedError(
                    f"collection store {self.path} is full: it reached its limit of {self.max_bytes} bytes "
                    "(max_disk_bytes); delete documents or raise the limit")
            target = self.max_bytes
        while True:  # a disk without room for the whole step may have room for a smaller one
            try:
                self.env.resize(target, f"growing the collection store to {target} bytes")
                return
            except ResourceExhaustedError:
                step = (target - size) // 2 // PAGE_BYTES * PAGE_BYTES
                if step < MIN_GROWTH or size + step < needed:
                    raise
                target = size + step

    def write(self, puts: Sequence[Put], deletes: Sequence[bytes] = (), meta: dict[bytes, bytes] | None = None,
              index: IndexWrite | None = None) -> None:
        """Apply deletes, puts, meta and the index's own changes (`index(txn)`) in one transaction."""

        def body(txn: lmdb.Transaction) -> None:
            for key in deletes:
                for db in (self._docs, self._codes, self._rescore, self._vids):
                    txn.delete(key, db=db)
            for put in puts:
                txn.put(put.key, put.document, db=self._docs)
                txn.put(put.key, put.code, db=self._codes)
                if put.rescore is not None:
                    txn.put(put.key, put.rescore, db=self._rescore)
                else:
                    txn.delete(put.key, db=self._rescore)
                if put.vid is not None:
                    txn.put(put.key, struct.pack(">q", put.vid), db=self._vids)
                else:
                    txn.delete(put.key, db=self._vids)
            self._put_meta(txn, meta)
            if index is not None:
                index(txn)

        self._transact(body)
        self.pages.charge(sum(len(p.document) + 2 * len(p.code) for p in puts))

    def transact(self, body: IndexWrite, meta: dict[bytes, bytes] | None = None) -> None:
        """One write transaction for the index and meta alone (a flush of its write buffer, a rebuild)."""

        def both(txn: lmdb.Transaction) -> None:
            body(txn)
            self._put_meta(txn, meta)

        self._transact(both)

    def reserve(self, extra_bytes: int) -> None:
        """Grow the map ahead of a large transaction, so it is not rerun after a MapFullError. Only
        a hint: with no room for all of it, the transaction grows the map as it goes (or fails)."""
        with self.env.write_lock:
            needed = self.disk_bytes() + extra_bytes
            if needed > self.env.map_size:
                with contextlib.suppress(ResourceExhaustedError):
                    self._grow(min(needed, self.max_bytes or needed))

    def _put_meta(self, txn: lmdb.Transaction, meta: dict[bytes, bytes] | None) -> None:
        for key, value in (meta or {}).items():
            txn.put(key, value, db=self._meta)

    def delete_meta(self, keys: Sequence[bytes]) -> None:
        def body(txn: lmdb.Transaction) -> None:
            for key in keys:
                txn.delete(key, db=self._meta)

        self._transact(body)

    def get_meta(self, key: bytes) -> bytes | None:
        with self.env.begin() as txn:
            return txn.get(key, db=self._meta)

    def meta_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Meta entries whose key starts with `prefix` (keys sorted)."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._meta)
            found = []
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    found.append((bytes(key), bytes(value)))
            return found

    def rewrite_codes(self, keys: Sequence[bytes], codes: np.ndarray, rescore: np.ndarray | None,
                      meta: dict[bytes, bytes], drop_meta: Sequence[bytes] = ()) -> None:
        """Replace the codes of `keys` (and their rescoring codes: removed when `rescore` is None)
        and set `meta` in one transaction (a codec switch)."""

        def body(txn: lmdb.Transaction) -> None:
            for i, key in enumerate(keys):
                txn.put(key, codes[i].tobytes(), db=self._codes)
                if rescore is not None:
                    txn.put(key, rescore[i].tobytes(), db=self._rescore)
                else:
                    txn.delete(key, db=self._rescore)
            self._put_meta(txn, meta)
            for key in drop_meta:
                txn.delete(key, db=self._meta)

        self._transact(body)

    def set_vids(self, keys: Sequence[bytes], vids: np.ndarray, meta: dict[bytes, bytes], index: IndexWrite) -> None:
        """Give every key its index id, with the index's build, in one transaction (flat -> SPANN)."""

        def body(txn: lmdb.Transaction) -> None:
            txn.drop(self._vids, delete=False)
            for key, vid in zip(keys, vids.tolist(), strict=True):
                txn.put(key, struct.pack(">q", vid), db=self._vids)
            self._put_meta(txn, meta)
            index(txn)

        self._transact(body)

    def load(self, code_size: int) -> tuple[list[bytes], list[JSONDict], np.ndarray]:
        """All (keys, metadata, codes) in key order, for rebuilding the in-RAM index on open."""
        keys, metadata, codes = self._side_by_side(self._codes, "codes")
        return keys, metadata, np.frombuffer(b"".join(codes), dtype=np.uint8).reshape(len(keys), code_size).copy()

    def load_keyed(self) -> tuple[list[bytes], list[JSONDict], np.ndarray]:
        """(keys, metadata, vids) without the codes: what an index kept on disk needs on open."""
        keys, metadata, vids = self._side_by_side(self._vids, "index ids")
        return keys, metadata, np.frombuffer(b"".join(vids), dtype=">i8").astype(np.int64)

    def _side_by_side(self, db: lmdb._Database, what: str) -> tuple[list[bytes], list[JSONDict], list[bytes]]:
        """(keys, metadata of the documents, values of `db`), checking both hold the same keys.

        One document at a time: holding them all (texts included) made opening a 150k collection
        take 200 MB more than it keeps; the pages read are released as the scan goes."""
        keys: list[bytes] = []
        metadata: list[JSONDict] = []
        values: list[bytes] = []
        with self.env.begin(buffers=True) as txn:
            docs, other = txn.cursor(db=self._docs), txn.cursor(db=db)
            for (key, doc), (other_key, value) in itertools.zip_longest(docs, other, fillvalue=(None, None)):
                if key is None or other_key is None or doc is None or value is None or bytes(key) != bytes(other_key):
                    raise RuntimeError(f"{self.path}: documents and {what} disagree; the store is damaged")
                keys.append(bytes(key))
                metadata.append(json.loads(bytes(doc)).get("metadata", {}))
                values.append(bytes(value))
                self.pages.charge(len(doc) + len(value))
        return keys, metadata, values

    def get_codes(self, keys: Sequence[bytes], code_size: int, bulk: bool = True) -> np.ndarray:
        return self._fixed_size(self._codes, keys, code_size, "codes", bulk)

    def get_documents(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self.env.begin() as txn:
            return [txn.get(k, db=self._docs) for k in keys]

    def get_rescore_codes(self, keys: Sequence[bytes], code_size: int) -> np.ndarray:
        return self._fixed_size(self._rescore, keys, code_size, "rescoring codes", bulk=False)

    def _fixed_size(self, db: lmdb._Database, keys: Sequence[bytes], code_size: int, what: str,
                    bulk: bool) -> np.ndarray:
        """Values of `keys`; `bulk` reads (builds, exports) release the pages they map as they go,
        searches keep theirs."""
        blobs: list[bytes] = []
        with self.env.begin(buffers=True) as txn:
            for lo in range(0, len(keys), BULK_READ):
                part = keys[lo:lo + BULK_READ]
                blobs.extend(bytes(txn.get(k, db=db) or b"") for k in part)
                if bulk:  # a rebuild reads every code, each key on a leaf page of its own
                    self.pages.charge(len(part) * PAGE_BYTES)
        if any(len(b) != code_size for b in blobs):
            raise RuntimeError(f"{self.path}: missing {what}")
        return np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(keys), code_size)

    def disk_bytes(self) -> int:
        """Bytes of the LMDB file in use (the file itself may be sparse up to the map size)."""
        return int((self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"])
