"""Posting lists in LMDB: one key per list, the value one contiguous block [count | ids | codes].

A list costs one read, zero-copy through LMDB's memory map (read inside the transaction).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from nestvec.index.store import StoreEnv
from nestvec.memory import CAN_MADVISE, MADV_WILLNEED, madvise, mapped_file, storage_reads

_HEADER = struct.Struct("<I")


def list_key(list_id: int) -> bytes:
    return struct.pack(">I", list_id)  # big-endian: keys sort by list id


def pack_list(ids: np.ndarray, codes: np.ndarray) -> bytes:
    return _HEADER.pack(len(ids)) + np.ascontiguousarray(ids, dtype="<i8").tobytes() + np.ascontiguousarray(
        codes, dtype=np.uint8).tobytes()


def unpack_list(blob: Any, code_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Views into `blob` (valid only while its transaction is open)."""
    (count,) = _HEADER.unpack_from(blob, 0)
    ids = np.frombuffer(blob, dtype="<i8", count=count, offset=_HEADER.size)
    codes = np.frombuffer(blob, dtype=np.uint8, count=count * code_size,
                          offset=_HEADER.size + 8 * count).reshape(count, code_size)
    return ids, codes


class PostingStore:
    def __init__(self, env: lmdb.Environment | StoreEnv, name: bytes = b"postings") -> None:
        """`env`: a collection's store (StoreEnv) or a bare environment of its own (tests, benchmarks)."""
        self.env = env
        self.db = env.open_db(name)
        # Centroids and tombstones live in the same environment, so a split or a delete commits
        # together with the lists it changes.
        self.centroid_db = env.open_db(name + b".centroids")
        self.tombstone_db = env.open_db(name + b".tombstones")
        self.meta_db = env.open_db(name + b".meta")
        # Where each list's bytes sat in the map when last read. Only used as madvise hints issued
        # before LMDB's own lookups fault pages one by one; a stale entry is a harmless wrong hint.
        self._where: dict[int, tuple[int, int]] = {}
        self.pages = mapped_file(Path(env.path()) / "data.mdb")

    def write_centroids(self, txn: lmdb.Transaction, centroids: Mapping[int, np.ndarray | None]) -> None:
        """Put centroids; None retires a list (its centroid and its postings go)."""
        for list_id, vector in centroids.items():
            if vector is None:
                txn.delete(list_key(list_id), db=self.centroid_db)
                txn.delete(list_key(list_id), db=self.db)
            else:
                txn.put(list_key(list_id), np.ascontiguousarray(vector, dtype="<f4").tobytes(), db=self.centroid_db)

    def read_centroids(self, dim: int) -> np.ndarray:
        """[lists, dim]; retired ids in between are NaN rows."""
        with self.env.begin() as txn:
            items = [(struct.unpack(">I", key)[0], np.frombuffer(value, dtype="<f4"))
                     for key, value in txn.cursor(db=self.centroid_db)]
        out = np.full((items[-1][0] + 1 if items else 0, dim), np.nan, dtype=np.float32)
        for list_id, vector in items:
            out[list_id] = vector
        return out

    def write_rotation(self, txn: lmdb.Transaction, rotation: np.ndarray) -> None:
        """The centroid prefix rotation commits with the centroids it was fitted on."""
        txn.put(b"rotation", np.ascontiguousarray(rotation, dtype="<f4").tobytes(), db=self.meta_db)

    def read_rotation(self, dim: int) -> np.ndarray:
        with self.env.begin() as txn:
            raw = txn.get(b"rotation", db=self.meta_db)
        if raw is None:
            raise RuntimeError("the index has no centroid rotation; it was never built")
        return np.frombuffer(raw, dtype="<f4").reshape(dim, dim).astype(np.float32)

    def drop(self) -> None:
        """Delete this store's databases (an index replaced by a codec switch)."""
        with self.env.begin(write=True) as txn:
            for db in (self.db, self.centroid_db, self.tombstone_db, self.meta_db):
                txn.drop(db, delete=True)

    def clear(self, txn: lmdb.Transaction) -> None:
        """Empty lists, centroids and tombstones (before a rebuild in the same transaction)."""
        for db in (self.db, self.centroid_db, self.tombstone_db):
            txn.drop(db, delete=False)

    def add_tombstones(self, txn: lmdb.Transaction, ids: np.ndarray) -> None:
        for vid in ids.tolist():
            txn.put(struct.pack(">q", vid), b"", db=self.tombstone_db)

    def read_tombstones(self) -> np.ndarray:
        with self.env.begin() as txn:
            keys = [struct.unpack(">q", k)[0] for k, _ in txn.cursor(db=self.tombstone_db)]
        return np.array(sorted(keys), dtype=np.int64)

    def write(self, lists: Mapping[int, tuple[np.ndarray, np.ndarray]], txn: lmdb.Transaction | None = None) -> None:
        """Replace whole lists (in the caller's transaction when given, so it commits with the rest)."""
        if txn is None:
            with self.env.begin(write=True) as own:
                self.write(lists, own)
            return
        for list_id, (ids, codes) in lists.items():
            blob = pack_list(ids, codes)
            txn.put(list_key(list_id), blob, db=self.db)
            self.pages.charge(2 * len(blob))  # the list written and the old one read before it

    def read(self, txn: lmdb.Transaction, list_ids: Iterable[int],
             code_size: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        list_ids = [int(list_id) for list_id in list_ids]
        if CAN_MADVISE and storage_reads.lately():
            return self._read_hinted(txn, list_ids, code_size)
        found = []
        for list_id in list_ids:
            blob = txn.get(list_key(list_id), db=self.db)
            if blob is not None:
                found.append((list_id, *unpack_list(blob, code_size)))
        return found

    def _read_hinted(self, txn: lmdb.Transaction, list_ids: list[int],
                     code_size: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Every list's pages hinted before any is touched, so the reads are issued together."""
        # Where the lists sat when last read, hinted before LMDB's own lookups fault pages one by
        # one. While storage is being read, every list is hinted every time: skipping lists hinted
        # in the last second tripled the latency under a memory cap, where pages are evicted within it.
        for list_id in list_ids:
            hint = self._where.get(list_id)
            if hint is not None:
                madvise(*hint, MADV_WILLNEED)
        found = []
        for list_id in list_ids:
            blob = txn.get(list_key(list_id), db=self.db)
            if blob is None:
                continue
            raw = np.frombuffer(blob, dtype=np.uint8)
            if isinstance(blob, memoryview) and len(raw):  # a map address: skip lists hinted above there
                address, hint = raw.__array_interface__["data"][0], self._where.get(list_id)
                if hint is None or hint[0] != address or hint[1] != len(raw):
                    madvise(address, len(raw), MADV_WILLNEED)
                    self._where[list_id] = (address, len(raw))
            found.append((list_id, raw))
        return [(list_id, *unpack_list(raw, code_size)) for list_id, raw in found]
