"""Frozen value types shared by every layer (never proto, never numpy-backed views of storage)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict, TypeVar

import numpy as np

JSONDict = dict[str, Any]


class SearchOptions(TypedDict, total=False):
    """Search knobs every transport takes, as keywords (Collection.search_batch says what each does)."""

    model: str | None
    rescore_candidates: int | None
    nprobe: int | None
    mode: str
    fusion: str
    rrf_k: int
    alpha: float
    with_vectors: bool
    allow_partial: bool


T = TypeVar("T")


class Hits(list[T]):
    """Search results that can say which shards of a sharded collection they lack: a search
    with allow_partial answers without a shard that has no live replica and names it here."""

    def __init__(self, items: Iterable[T] = (), missing_shards: tuple[int, ...] = ()) -> None:
        super().__init__(items)
        self.missing_shards = missing_shards


@dataclass(frozen=True)
class EncoderIdentity:
    """What a collection records about the model that made its vectors."""

    model: str
    weights_sha256: str
    dim: int
    layers: int | None = None  # transformer layers kept (2D Matryoshka); None: all of them

    def to_json(self) -> JSONDict:
        out = asdict(self)
        if self.layers is None:
            del out["layers"]  # configs written before layer cuts existed stay byte-identical
        return out

    @classmethod
    def from_json(cls, data: JSONDict) -> EncoderIdentity:
        layers = data.get("layers")
        return cls(model=str(data["model"]), weights_sha256=str(data["weights_sha256"]), dim=int(data["dim"]),
                   layers=None if layers is None else int(layers))

    def matches(self, model: str) -> bool:
        """True when `model` names this encoder: its model name or (a prefix of) its weights hash."""
        return model == self.model or (len(model) >= 12 and self.weights_sha256.startswith(model))


@dataclass(frozen=True)
class Record:
    id: str
    text: str | None
    metadata: JSONDict = field(default_factory=dict)


@dataclass(frozen=True)
class UpsertBatch:
    """One batch of a streamed upsert: committed in one transaction, with its checkpoint if any."""

    ids: Any  # Sequence[str | int]
    texts: Any = None  # Sequence[str | None] | None
    vectors: Any = None  # [n, dim] floats | None
    metadata: Any = None  # Sequence[JSONDict | None] | None
    checkpoint: tuple[str, JSONDict] | None = None


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    text: str | None
    metadata: JSONDict = field(default_factory=dict)
    # Lexical and hybrid searches: each side's own score and 1-based rank (None: not in its top).
    dense_score: float | None = None
    dense_rank: int | None = None
    lexical_score: float | None = None
    lexical_rank: int | None = None
    vector: np.ndarray | None = field(default=None, compare=False, repr=False)  # with_vectors: stored vector


@dataclass(frozen=True)
class CollectionConfig:
    """Saved as collection.json beside the collection's data."""

    name: str
    dim: int
    codec: str
    encoder: EncoderIdentity | None
    metric: str = "cosine"
    format_version: int = 1
    index: str = "auto"  # "flat" | "spann" | "auto" (flat while small, SPANN from a size on)

    def to_json(self) -> JSONDict:
        data = asdict(self)
        data["encoder"] = self.encoder.to_json() if self.encoder else None
        return data

    @classmethod
    def from_json(cls, data: JSONDict) -> CollectionConfig:
        enc = data.get("encoder")
        return cls(
            name=str(data["name"]),
            dim=int(data["dim"]),
            codec=str(data["codec"]),
            encoder=EncoderIdentity.from_json(enc) if enc else None,
            metric=str(data.get("metric", "cosine")),
            format_version=int(data.get("format_version", 1)),
            index=str(data.get("index", "auto")),
        )
