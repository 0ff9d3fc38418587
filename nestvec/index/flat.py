"""Exact search: a scan of all codes through the codec, in RAM.

Codecs whose codes faiss can read byte for byte (fp32, fp16, int8, after any PCA / prefix) are
scanned by a faiss flat index (SIMD, GIL released); the others by a blockwise numpy scan.
Rows are append-only; deletes leave tombstones that `compact()` removes, so row numbers stay
stable between compactions and metadata columns can be kept aligned by the caller.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from nestvec.compression import Codec
from nestvec.index.topk import empty_topk, finalize, merge_topk


class FlatIndex:
    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._codes = np.zeros((0, codec.bytes_per_vector), dtype=np.uint8)
        self._size = 0
        self.live = np.zeros(0, dtype=bool)
        self._faiss: Any = None

    @property
    def rows(self) -> int:
        """Rows including tombstones."""
        return self._size

    @property
    def tombstones(self) -> int:
        return int(self._size - np.count_nonzero(self.live[: self._size]))

    def codes(self) -> np.ndarray:
        return self._codes[: self._size]

    def append(self, codes: np.ndarray) -> np.ndarray:
        """Add codes; returns their row numbers."""
        n = len(codes)
        if self._size + n > len(self._codes):
            capacity = max(1024, 2 * (self._size + n))
            grown = np.zeros((capacity, self._codes.shape[1]), dtype=np.uint8)
            grown[: self._size] = self._codes[: self._size]
            self._codes = grown
            live = np.zeros(capacity, dtype=bool)
            live[: self._size] = self.live[: self._size]
            self.live = live
        rows = np.arange(self._size, self._size + n)
        self._codes[rows] = codes
        self.live[rows] = True
        self._size += n
        if self._faiss is not None and self._faiss is not False and n:  # False: faiss cannot read these codes
            self._faiss.add_sa_codes(np.ascontiguousarray(codes, dtype=np.uint8))
        return rows

    def remove(self, rows: np.ndarray) -> None:
        self.live[rows] = False

    def compact(self) -> np.ndarray:
        """Drop tombstones; returns the old row of each new row."""
        keep = np.flatnonzero(self.live[: self._size])
        self._codes = np.ascontiguousarray(self._codes[keep])
        self.live = np.ones(len(keep), dtype=bool)
        self._size = len(keep)
        self._faiss = None
        self._ensure_faiss()
        return keep

    def _ensure_faiss(self) -> Any:
        """Build the faiss mirror of the codes once the codec is fitted (and if faiss can read them)."""
        if self._faiss is None and self.codec.fitted:
            index = self.codec.quantizer.faiss_index()
            if index is not None and self._size:
                index.add_sa_codes(np.ascontiguousarray(self.codes()))
            self._faiss = index if index is not None else False
        return self._faiss or None

    def search(self, queries: np.ndarray, k: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, rows) [nq, k] per query; `allowed` is an optional row mask."""
        mask = self.live[: self._size] if allowed is None else self.live[: self._size] & allowed
        if not mask.any():
            return empty_topk(len(queries), k)
        index = self._ensure_faiss()
        if index is not None:
            return self._search_faiss(index, queries, k, mask)
        best_scores, best_rows = empty_topk(len(queries), k)
        for start, block in self.codec.iter_scores(queries, self.codes()):
            block_mask = mask[start:start + block.shape[1]]
            if not block_mask.all():
                block = np.where(block_mask, block, -np.inf).astype(np.float32)
            best_scores, best_rows = merge_topk(best_scores, best_rows, block, start, k)
        return finalize(best_scores, best_rows)

    def _search_faiss(self, index: Any, queries: np.ndarray, k: int,
                      mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prepared, offset = self.codec.prepare_queries(queries)
        prepared, shift = self.codec.quantizer.faiss_queries(prepared)
        offset = offset + shift
        params = None
        if not mask.all():
            bits = np.packbits(mask, bitorder="little")
            params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)))  # type: ignore[call-arg]
        scores, rows = index.search(prepared, k, params=params)
        scores = np.where(rows >= 0, scores + offset[:, None], -np.inf).astype(np.float32)
        return finalize(scores, rows.astype(np.int64))
