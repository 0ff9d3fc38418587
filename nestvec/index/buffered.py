"""SPANN postings plus a brute-force write buffer: the index a large collection searches.

New vectors land in a small in-RAM flat buffer (their codes are already durable in the
collection's store) and are flushed into the posting lists in one transaction once the buffer
is full, so a batch of upserts rewrites each touched list once per flush, not once per batch.
Search merges the postings' top-k with the buffer's exact top-k. Ids ("vids") are the
collection's append-only vector ids; buffer row = vid - base.
"""

from __future__ import annotations

from collections.abc import Callable

import lmdb
import numpy as np

from nestvec.compression import Codec
from nestvec.index.flat import FlatIndex
from nestvec.index.spann import SpannIndex
from nestvec.index.topk import finalize, rerank

Apply = Callable[[], None]


class BufferedSpann:
    def __init__(self, spann: SpannIndex, codec: Codec, base: int) -> None:
        self.spann, self.codec, self.base = spann, codec, base
        self.buffer = FlatIndex(codec)

    @property
    def next_vid(self) -> int:
        return self.base + self.buffer.rows

    @property
    def buffered(self) -> int:
        return self.buffer.rows - self.buffer.tombstones

    def add(self, vids: np.ndarray, codes: np.ndarray) -> None:
        """In RAM, after the codes committed; vids must continue the sequence."""
        if len(vids) and int(vids[0]) != self.next_vid:
            raise RuntimeError(f"vid {int(vids[0])} does not follow {self.next_vid}")
        self.buffer.append(codes)

    def stage_remove(self, txn: lmdb.Transaction, vids: np.ndarray) -> Apply:
        """Tombstone in the postings (a flushed vid may sit in several lists); drop from the buffer."""
        vids = np.asarray(vids, dtype=np.int64)
        apply_spann = self.spann.stage_delete(txn, vids)

        def apply() -> None:
            apply_spann()
            self.buffer.remove(vids[vids >= self.base] - self.base)

        return apply

    def stage_flush(self, txn: lmdb.Transaction) -> Apply:
        """Move the buffer's live vectors into the posting lists (splitting lists as they fill)."""
        rows = np.flatnonzero(self.buffer.live[: self.buffer.rows])
        apply_spann = self.spann.stage_insert(txn, self.buffer.codes()[rows], rows + self.base) if len(rows) else None
        next_base = self.next_vid

        def apply() -> None:
            if apply_spann is not None:
                apply_spann()
            self.base = next_base
            self.buffer = FlatIndex(self.codec)

        return apply

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               nprobe: int | None = None, eps2: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, vids) [nq, k], vids padded with -1."""
        scores, vids = self.spann.search(queries, k, nprobe=nprobe, eps2=eps2, allowed=allowed)
        if not self.buffered:
            return finalize(scores, vids)
        window = None
        if allowed is not None:
            window = np.zeros(self.buffer.rows, dtype=bool)
            part = allowed[self.base: self.base + self.buffer.rows]
            window[: len(part)] = part
        more_scores, rows = self.buffer.search(queries, k, window)
        more_vids = np.where(rows >= 0, rows + self.base, -1)
        return rerank(np.concatenate([scores, more_scores], axis=1), np.concatenate([vids, more_vids], axis=1), k)
