"""RaLMSpec's local cache: the passages the store returned during one answer, with their stored
vectors, answering the next retrieval speculatively.

The store returns more than the pipeline packs (top-k plus `prefetch`, with_vectors=True), so the
cache holds the neighbourhood the answer is moving through. A speculation is the cache's exact
top-k by inner product with the step's query vector, ties broken by id as the store breaks them.
Whenever the store's true top-k has been cached, dense search gets it right even where the
previous step's passages are wrong (the ranking changed but stayed inside the neighbourhood).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from nestvec.rag.context import Passage


class PassageCache:
    """Passages by id and their unit vectors, stacked for one matrix product per speculation.
    Filled from the verification thread while the generating thread reads it: one lock."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._lock = threading.Lock()
        self._passages: list[Passage] = []
        self._ids = np.zeros(0, dtype=str)
        self._vectors = np.zeros((0, dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._passages)

    def clear(self) -> None:
        with self._lock:
            self._passages, self._ids = [], np.zeros(0, dtype=str)
            self._vectors = np.zeros((0, self.dim), dtype=np.float32)

    def add(self, passages: Sequence[Passage], vectors: np.ndarray) -> None:
        """Cache passages the store returned (a passage seen again keeps its first entry)."""
        with self._lock:
            seen, fresh = set(self._ids.tolist()), []
            for i, passage in enumerate(passages):  # tens of passages per store call
                if passage.id not in seen:
                    seen.add(passage.id)
                    fresh.append(i)
            if not fresh:
                return
            rows = np.asarray(vectors, dtype=np.float32)[fresh]
            rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
            self._passages = self._passages + [passages[i] for i in fresh]
            self._ids = np.concatenate([self._ids, np.array([passages[i].id for i in fresh])])
            self._vectors = np.concatenate([self._vectors, rows])

    def top_k(self, query: np.ndarray, k: int) -> list[Passage]:
        """The cached passages nearest `query`, best first; equal scores in id order."""
        with self._lock:
            passages, ids, vectors = self._passages, self._ids, self._vectors
        if not passages:
            return []
        scores = vectors @ np.asarray(query, dtype=np.float32)
        order = np.lexsort((ids, -scores))[:k]  # the last key sorts first: score descending, then id
        return [Passage(passages[i].id, passages[i].text, float(scores[i]), passages[i].metadata)
                for i in order.tolist()]
