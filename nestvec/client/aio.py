"""asyncio API over either transport: the same methods as the sync client, awaitable.

Calls run in worker threads (asyncio.to_thread): the embedded path releases the GIL in numpy,
faiss and LMDB, the remote path while waiting on the network, so many awaits overlap.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, Unpack

import numpy as np

from nestvec.client.base import ClientBase, CollectionHandle
from nestvec.types import Hit, JSONDict, Record, SearchOptions

T = TypeVar("T")


async def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


class AsyncCollection:
    def __init__(self, handle: CollectionHandle) -> None:
        self.sync = handle

    @property
    def name(self) -> str:
        return self.sync.name

    async def upsert(self, ids: Sequence[str | int], texts: Sequence[str | None] | None = None, vectors: Any = None,
                     metadata: Sequence[JSONDict | None] | None = None, *,
                     checkpoint: tuple[str, JSONDict] | None = None) -> int:
        return await _run(self.sync.upsert, ids, texts=texts, vectors=vectors, metadata=metadata,
                          checkpoint=checkpoint)

    async def delete(self, ids: Sequence[str | int]) -> int:
        return await _run(self.sync.delete, ids)

    async def get(self, ids: Sequence[str | int]) -> list[Record | None]:
        return await _run(self.sync.get, ids)

    async def count(self) -> int:
        return await _run(self.sync.count)

    async def jobs(self) -> dict[str, JSONDict]:
        return await _run(self.sync.jobs)

    async def search(self, query: str | Sequence[float] | np.ndarray, k: int = 10, filter: JSONDict | None = None,
                     *, vector: Sequence[float] | np.ndarray | None = None,
                     **options: Unpack[SearchOptions]) -> list[Hit]:
        return await _run(self.sync.search, query, k, filter, vector=vector, **options)

    async def search_batch(self, queries: Sequence[str] | np.ndarray, k: int = 10, filter: JSONDict | None = None,
                           *, vectors: np.ndarray | Sequence[Sequence[float]] | None = None,
                           **options: Unpack[SearchOptions]) -> list[list[Hit]]:
        return await _run(self.sync.search_batch, queries, k, filter, vectors=vectors, **options)

    async def info(self) -> JSONDict:
        return await _run(self.sync.info)


class AsyncClient:
    """`await nestvec.aconnect(path_or_url)`; use `async with` to close it."""

    def __init__(self, client: ClientBase) -> None:
        self.sync = client

    async def create_collection(self, name: str, **kwargs: Any) -> AsyncCollection:
        return AsyncCollection(await _run(self.sync.create_collection, name, **kwargs))

    async def get_collection(self, name: str) -> AsyncCollection:
        return AsyncCollection(await _run(self.sync.get_collection, name))

    async def list_collections(self) -> list[str]:
        return await _run(self.sync.list_collections)

    async def drop_collection(self, name: str) -> None:
        await _run(self.sync.drop_collection, name)

    async def close(self) -> None:
        await _run(self.sync.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def aconnect(target: str | os.PathLike[str], **kwargs: Any) -> AsyncClient:
    """Async twin of nestvec.connect: a data folder or "grpc://host:port"."""
    from nestvec.client import connect

    return AsyncClient(await _run(connect, target, **kwargs))
