"""LMDB storage of one collection: documents, codes, rescoring codes and index ids, keyed by id.

One write transaction per batch covers all of them, and the vector index's own databases (posting
lists, centroids, tombstones) live in the same environment and join that transaction, so a batch
lands whole or not at all. One Environment per path per process (LMDB forbids opening the same
file twice). Readahead is off: index reads are random, and under a memory cap the kernel's
readahead evicts pages a query still needs.
"""

from __future__ import annotations

import itertools
import json
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from nestvec.concurrency import PerPath
from nestvec.memory import mapped_file
from nestvec.types import JSONDict

INITIAL_MAP_SIZE = 64 << 20
PAGE_BYTES = 4096
BULK_READ = 2048  # keys read by key between checks on the pages mapped
IndexWrite = Callable[[lmdb.Transaction], None]


def _open_lmdb(path: Path) -> lmdb.Environment:
    path.mkdir(parents=True, exist_ok=True)
    return lmdb.open(str(path.resolve()), map_size=INITIAL_MAP_SIZE, max_dbs=16, subdir=True, lock=True,
                     readahead=False, writemap=True)


_ENVS: PerPath[lmdb.Environment] = PerPath(_open_lmdb, lambda env: env.close())
_open_env, _release_env = _ENVS.acquire, _ENVS.release


@dataclass(frozen=True)
class Put:
    key: bytes
    document: bytes
    code: bytes
    rescore: bytes | None = None
    vid: int | None = None  # the vector index's id for this key, when the index needs one kept


class LmdbStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = _open_env(path)
        self._docs = self.env.open_db(b"docs")
        self._codes = self.env.open_db(b"codes")
        self._rescore = self.env.open_db(b"rescore")
        self._meta = self.env.open_db(b"meta")
        self._vids = self.env.open_db(b"vids")
        self._write_lock = threading.Lock()
        self.pages = mapped_file(path / "data.mdb")  # what bulk writes leave mapped is released as they go

    def close(self) -> None:
        _release_env(self.path)

    def _transact(self, body: Callable[[lmdb.Transaction], None]) -> None:
        """Run `body` in one write transaction; on a full map, grow it and run again from scratch."""
        with self._write_lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        body(txn)
                    return
                except lmdb.MapFullError:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)

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
        """Grow the map ahead of a large transaction, so it is not rerun after a MapFullError."""
        with self._write_lock:
            size = self.env.info()["map_size"]
            target = size
            while target < self.disk_bytes() + extra_bytes:
                target *= 2
            if target != size:
                self.env.set_mapsize(target)

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
