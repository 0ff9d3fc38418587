"""Posting lists in LMDB: one key per list, the value one contiguous block [count | ids | codes].

A list costs one read, zero-copy through LMDB's memory map (read inside the transaction).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

import lmdb
import numpy as np

_HEADER = struct.Struct("<I")


def list_key(list_id: int) -> bytes:
    return struct.pack(">I", list_id)  # big-endian: keys sort by list id


def pack_list(ids: np.ndarray, codes: np.ndarray) -> bytes:
    return _HEADER.pack(len(ids)) + np.ascontiguousarray(ids, dtype="<i8").tobytes() + np.ascontiguousarray(
        codes, dtype=np.uint8).tobytes()


def unpack_list(blob: memoryview | bytes, code_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Views into `blob` (valid only while its transaction is open)."""
    (count,) = _HEADER.unpack_from(blob, 0)
    ids = np.frombuffer(blob, dtype="<i8", count=count, offset=_HEADER.size)
    codes = np.frombuffer(blob, dtype=np.uint8, count=count * code_size,
                          offset=_HEADER.size + 8 * count).reshape(count, code_size)
    return ids, codes


class PostingStore:
    def __init__(self, env: lmdb.Environment, name: bytes = b"postings") -> None:
        self.env = env
        self.db = env.open_db(name)
        # Centroids and tombstones live in the same environment, so a split or a delete commits
        # together with the lists it changes.
        self.centroid_db = env.open_db(name + b".centroids")
        self.tombstone_db = env.open_db(name + b".tombstones")

    def write_centroids(self, txn: lmdb.Transaction, centroids: Mapping[int, np.ndarray]) -> None:
        for list_id, vector in centroids.items():
            txn.put(list_key(list_id), np.ascontiguousarray(vector, dtype="<f4").tobytes(), db=self.centroid_db)

    def read_centroids(self, dim: int) -> np.ndarray:
        with self.env.begin() as txn:
            rows = [np.frombuffer(v, dtype="<f4") for _, v in txn.cursor(db=self.centroid_db)]
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)

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
            txn.put(list_key(list_id), pack_list(ids, codes), db=self.db)

    def read(self, txn: lmdb.Transaction, list_ids: Iterable[int],
             code_size: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        out = []
        for list_id in list_ids:
            blob = txn.get(list_key(int(list_id)), db=self.db)
            if blob is not None:
                ids, codes = unpack_list(blob, code_size)
                out.append((int(list_id), ids, codes))
        return out
