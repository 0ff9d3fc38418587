"""A replica's operation log: every write it applied, by sequence number, in its own LMDB next
to its collection. A replica that missed writes replays a sibling's log from its last applied
number; a replica that crashed between logging and applying replays its own."""

from __future__ import annotations

import struct
from pathlib import Path

import lmdb

MAP_SIZE = 64 << 20


def _key(seq: int) -> bytes:
    return struct.pack(">Q", seq)  # big-endian: LMDB's key order is sequence order


class OpLog:
    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(path), map_size=MAP_SIZE, subdir=True, max_dbs=1)

    def close(self) -> None:
        self.env.close()

    def append(self, seq: int, data: bytes) -> None:
        """Durable before the write is applied (LMDB commits synchronously)."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    txn.put(_key(seq), data, overwrite=False)
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def last(self) -> int:
        with self.env.begin() as txn:
            cursor = txn.cursor()
            return int(struct.unpack(">Q", cursor.key())[0]) if cursor.last() else 0

    def read(self, after: int, upto: int | None = None) -> list[tuple[int, bytes]]:
        """Entries with after < seq <= upto, in order."""
        out: list[tuple[int, bytes]] = []
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.set_range(_key(after + 1)):
                return out
            for key, value in cursor:
                seq = int(struct.unpack(">Q", key)[0])
                if upto is not None and seq > upto:
                    break
                out.append((seq, bytes(value)))
        return out
