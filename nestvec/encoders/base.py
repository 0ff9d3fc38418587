"""The Encoder protocol: text in, L2-normalised float32 Matryoshka embeddings out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from nestvec.errors import invalid
from nestvec.types import EncoderIdentity

Kind = Literal["document", "query"]


@runtime_checkable
class Encoder(Protocol):
    """Anything that turns texts into vectors and can say which model it is."""

    @property
    def identity(self) -> EncoderIdentity: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: str | Sequence[str], *, kind: Kind = "document", dim: int | None = None,
               show_progress: bool | None = None) -> np.ndarray:
        """1-D float32 for one string, [n, dim] float32 for a list; rows have unit norm."""
        ...


def truncate_normalize(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Take a Matryoshka prefix and renormalise it (a prefix of a unit vector is shorter than 1)."""
    x = np.asarray(vectors, dtype=np.float32)
    if dim is not None:
        if not 1 <= dim <= x.shape[-1]:
            raise invalid("dim", f"must be between 1 and {x.shape[-1]}, got {dim}")
        x = x[..., :dim]
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def check_texts(texts: str | Sequence[str], field: str = "texts") -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise invalid(f"{field}[{i}]", f"must be a string, got {type(text).__name__}")
    return out
