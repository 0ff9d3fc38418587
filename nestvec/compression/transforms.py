"""Dimension reduction before quantisation: none, a Matryoshka prefix, or a fitted PCA rotation."""

from __future__ import annotations

import numpy as np

from nestvec.compression.base import Arrays, Config
from nestvec.errors import FailedPreconditionError, invalid


class IdentityTransform:
    name = "identity"
    fitted = True
    min_fit_size = 0

    def __init__(self, dim: int) -> None:
        self.in_dim = self.out_dim = dim

    def fit(self, sample: np.ndarray) -> None:
        return None

    def apply_documents(self, x: np.ndarray) -> np.ndarray:
        return x

    def apply_queries(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return q, np.zeros(len(q), dtype=np.float32)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Back to the input space (approximately, where dimensions were dropped)."""
        if self.out_dim == self.in_dim:
            return y
        out = np.zeros((len(y), self.in_dim), dtype=np.float32)
        out[:, : self.out_dim] = y  # a prefix: the dropped tail is unknown
        return out

    def state(self) -> tuple[Config, Arrays]:
        return {}, {}

    def load_state(self, config: Config, arrays: Arrays) -> None:
        return None


class MatryoshkaTransform(IdentityTransform):
    """Keep the first `dim` components and renormalise: cosine in the prefix space."""

    name = "mrl"

    def __init__(self, in_dim: int, dim: int) -> None:
        if not 1 <= dim <= in_dim:
            raise invalid("codec", f"mrl{dim} needs 1 <= dim <= {in_dim}")
        self.in_dim, self.out_dim = in_dim, dim

    def _prefix(self, x: np.ndarray) -> np.ndarray:
        y = x[:, : self.out_dim]
        return np.ascontiguousarray(y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12))

    def apply_documents(self, x: np.ndarray) -> np.ndarray:
        return self._prefix(x)

    def apply_queries(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._prefix(q), np.zeros(len(q), dtype=np.float32)


class PCATransform:
    """Project onto the top principal components (scikit-learn PCA, fitted on a sample).

    Documents are centred, queries are not: q.x = q.mean + q.W^T W (x - mean) + (dropped part),
    so the per-query offset q.mean keeps scores on the cosine scale and ranking exact in the
    kept subspace.
    """

    name = "pca"

    def __init__(self, in_dim: int, dim: int) -> None:
        if not 1 <= dim <= in_dim:
            raise invalid("codec", f"pca{dim} needs 1 <= dim <= {in_dim}")
        self.in_dim, self.out_dim = in_dim, dim
        self.min_fit_size = dim
        self.components = np.zeros((dim, in_dim), dtype=np.float32)
        self.mean = np.zeros(in_dim, dtype=np.float32)
        self.fitted = False

    def fit(self, sample: np.ndarray) -> None:
        from sklearn.decomposition import PCA

        if len(sample) < self.min_fit_size:
            raise FailedPreconditionError(
                f"codec: pca{self.out_dim} needs at least {self.min_fit_size} vectors to fit, got {len(sample)}"
            )
        pca = PCA(n_components=self.out_dim, svd_solver="full", random_state=0).fit(sample)
        self.components = np.ascontiguousarray(pca.components_, dtype=np.float32)
        self.mean = np.ascontiguousarray(pca.mean_, dtype=np.float32)
        self.fitted = True

    def apply_documents(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((x - self.mean) @ self.components.T, dtype=np.float32)

    def apply_queries(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.ascontiguousarray(q @ self.components.T, dtype=np.float32),
            (q @ self.mean).astype(np.float32),
        )

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.mean + y @ self.components, dtype=np.float32)

    def state(self) -> tuple[Config, Arrays]:
        return {}, {"components": self.components, "mean": self.mean}

    def load_state(self, config: Config, arrays: Arrays) -> None:
        self.components = arrays["components"].astype(np.float32)
        self.mean = arrays["mean"].astype(np.float32)
        self.fitted = True
