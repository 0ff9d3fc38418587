"""Stage protocols. A codec = optional transform (PCA / Matryoshka prefix) + one quantizer.

Every stage is fitted once on a sample of the collection, then frozen and saved as
JSON config + .npy arrays (no pickle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

Arrays = dict[str, np.ndarray]
Config = dict[str, Any]


class Transform(Protocol):
    """Maps vectors to the space the quantizer codes; queries may carry a per-query score offset."""

    name: str
    in_dim: int
    out_dim: int
    fitted: bool
    min_fit_size: int

    def fit(self, sample: np.ndarray) -> None: ...

    def apply_documents(self, x: np.ndarray) -> np.ndarray: ...

    def apply_queries(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(transformed queries, offset added to every score of that query)."""
        ...

    def inverse(self, y: np.ndarray) -> np.ndarray: ...

    def state(self) -> tuple[Config, Arrays]: ...

    def load_state(self, config: Config, arrays: Arrays) -> None: ...


class Quantizer(Protocol):
    """Turns float rows into fixed-size uint8 codes and scores float queries against codes."""

    name: str
    dim: int
    code_size: int
    fitted: bool
    min_fit_size: int

    def fit(self, sample: np.ndarray) -> None: ...

    def encode(self, x: np.ndarray) -> np.ndarray: ...

    def decode(self, codes: np.ndarray) -> np.ndarray: ...

    def block_scores(self, queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Inner products [nq, n] of float32 queries with one block of codes."""
        ...

    def scorer(self, queries: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """block_scores with the per-query work done once: scanning many small posting lists
        pays it per list otherwise."""
        ...

    def faiss_index(self) -> Any:
        """An empty faiss index whose codes are byte-identical to ours (SIMD scans), or None."""
        ...

    def faiss_queries(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Queries as faiss_index scores them, and per query the offset that makes its scores ours."""
        ...

    def state(self) -> tuple[Config, Arrays]: ...

    def load_state(self, config: Config, arrays: Arrays) -> None: ...
