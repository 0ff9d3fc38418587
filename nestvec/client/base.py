"""The client API shared by the embedded (local folder) and remote (gRPC) transports."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, Unpack

import numpy as np

from nestvec.types import Hit, JSONDict, Record, SearchOptions, UpsertBatch


class CollectionHandle(Protocol):
    """What a client hands back for a collection, whichever the transport."""

    @property
    def name(self) -> str: ...

    def upsert(self, ids: Sequence[str | int], texts: Sequence[str | None] | None = None,
               vectors: Any = None, metadata: Sequence[JSONDict | None] | None = None, *,
               checkpoint: tuple[str, JSONDict] | None = None) -> int: ...

    def delete(self, ids: Sequence[str | int]) -> int: ...

    def get(self, ids: Sequence[str | int]) -> list[Record | None]: ...

    def count(self) -> int: ...

    def search(self, query: str | Sequence[float] | np.ndarray, k: int = 10, filter: JSONDict | None = None, *,
               vector: Sequence[float] | np.ndarray | None = None,
               **options: Unpack[SearchOptions]) -> list[Hit]: ...

    def search_batch(self, queries: Sequence[str] | np.ndarray, k: int = 10, filter: JSONDict | None = None, *,
                     vectors: np.ndarray | Sequence[Sequence[float]] | None = None,
                     **options: Unpack[SearchOptions]) -> list[list[Hit]]: ...

    def info(self) -> JSONDict: ...

    def jobs(self) -> dict[str, JSONDict]: ...

    def upsert_stream(self, batches: Iterable[UpsertBatch]) -> Iterator[int]: ...


class ClientBase(ABC):
    @abstractmethod
    def create_collection(self, name: str, *, encoder: Any = ..., dim: int | None = None,
                          codec: str = ..., index: str = "auto", exist_ok: bool = False, shards: int | None = None,
                          replicas: int | None = None) -> CollectionHandle: ...

    @abstractmethod
    def get_collection(self, name: str) -> CollectionHandle: ...

    @abstractmethod
    def list_collections(self) -> list[str]: ...

    @abstractmethod
    def drop_collection(self, name: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> ClientBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
