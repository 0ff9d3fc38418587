"""In-RAM heads of the SPANN index: hierarchical balanced k-means and prefix-first centroid search.

Centroids are searched on a short prefix of a PCA rotation of the centroids (AdANNS-IVF: 64 of
384 dims finds the right neighbourhood), then the best candidates are re-ranked on the full
centroid. MiniLM is not Matryoshka-trained, so a PCA rotation (dimensions ordered by variance)
gives the prefix; for a Matryoshka encoder the rotation is close to the identity anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class ClusteringConfig:
    posting_limit: int = 96      # [PostingVectorLimit] most vectors a list is built with
    branching: int = 16          # k of each k-means level
    iterations: int = 12
    seed: int = 0


def balanced_kmeans(x: np.ndarray, config: ClusteringConfig) -> tuple[np.ndarray, np.ndarray]:
    """Recursive faiss k-means until every cluster holds <= posting_limit vectors.

    Returns (labels [n], centroids [m, d]). The loop is over clusters, each split vectorised.
    """
    n, d = x.shape
    labels = np.zeros(n, dtype=np.int64)
    pending = [np.arange(n)]
    centroids: list[np.ndarray] = []
    while pending:
        members = pending.pop()
        if len(members) <= config.posting_limit:
            labels[members] = len(centroids)
            centroids.append(x[members].mean(axis=0))
            continue
        k = int(min(config.branching, int(np.ceil(len(members) / config.posting_limit))))
        k = max(k, 2)
        kmeans = faiss.Kmeans(d, k, niter=config.iterations, seed=config.seed + len(centroids),
                              min_points_per_centroid=1, max_points_per_centroid=1 << 30, spherical=False)
        kmeans.train(np.ascontiguousarray(x[members]))
        _, assign = kmeans.index.search(np.ascontiguousarray(x[members]), 1)
        parts = [members[assign[:, 0] == c] for c in range(k)]
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:  # degenerate (duplicates): cut in chunks rather than loop forever
            parts = np.array_split(members, int(np.ceil(len(members) / config.posting_limit)))
        pending.extend(parts)
    return labels, np.ascontiguousarray(np.stack(centroids), dtype=np.float32)


class CentroidIndex:
    """Nearest centroids of queries: prefix search on a PCA rotation, full-dimension re-rank."""

    def __init__(self, centroids: np.ndarray, rotation: np.ndarray, prefix_dim: int) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.rotation = np.ascontiguousarray(rotation, dtype=np.float32)  # [d, d], rows = components
        self.prefix_dim = prefix_dim
        self.norms = np.einsum("ij,ij->i", self.centroids, self.centroids)
        self._prefix = faiss.IndexFlatL2(prefix_dim)
        self._prefix.add(np.ascontiguousarray(self.centroids @ self.rotation[:prefix_dim].T))

    def set(self, updates: dict[int, np.ndarray]) -> None:
        """Replace or append centroids (list ids len(self), len(self)+1, ... append)."""
        grow = max(updates) + 1 - len(self.centroids) if updates else 0
        if grow > 0:
            self.centroids = np.concatenate([self.centroids, np.zeros((grow, self.centroids.shape[1]), np.float32)])
        for list_id, vector in updates.items():
            self.centroids[list_id] = vector
        self.norms = np.einsum("ij,ij->i", self.centroids, self.centroids)
        self._prefix.reset()
        self._prefix.add(np.ascontiguousarray(self.centroids @ self.rotation[: self.prefix_dim].T))

    @classmethod
    def fit(cls, centroids: np.ndarray, prefix_dim: int) -> CentroidIndex:
        centered = centroids - centroids.mean(axis=0)
        _, _, vt = np.linalg.svd(centered, full_matrices=True)
        return cls(centroids, vt.astype(np.float32), min(prefix_dim, centroids.shape[1]))

    def __len__(self) -> int:
        return len(self.centroids)

    def search(self, queries: np.ndarray, n: int, rerank: int = 4,
               chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, list ids) [nq, n], nearest first, exact on the full centroids."""
        if len(queries) > chunk:  # bounds the [chunk, candidates, d] gather of the re-rank
            parts = [self.search(queries[i:i + chunk], n, rerank, chunk) for i in range(0, len(queries), chunk)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        n = min(n, len(self.centroids))
        wide = min(len(self.centroids), n * rerank)
        _, cand = self._prefix.search(np.ascontiguousarray(queries @ self.rotation[: self.prefix_dim].T), wide)
        cand = np.where(cand < 0, 0, cand)
        q_norms = np.einsum("ij,ij->i", queries, queries)[:, None]
        dots = np.einsum("qd,qcd->qc", queries, self.centroids[cand])
        dist = q_norms + self.norms[cand] - 2 * dots
        order = np.argsort(dist, axis=1, kind="stable")[:, :n]
        return np.take_along_axis(dist, order, axis=1), np.take_along_axis(cand, order, axis=1)
