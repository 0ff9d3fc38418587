"""The asyncio API gives the same results and errors as the sync one, on both transports."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

import nestvec
from nestvec.errors import InvalidArgumentError, NotFoundError
from realdata import shipped_embeddings
from servers import ADMIN_KEY, RunningServer

IDS, VECTORS = shipped_embeddings("scifact")


async def _exercise(target: str, **kwargs: object) -> None:
    async with await nestvec.aconnect(target, **kwargs) as client:
        col = await client.create_collection("a", encoder=None, dim=384, codec="int8")
        assert await col.upsert(IDS[:1200], vectors=VECTORS[:1200]) == 1200
        results = await asyncio.gather(*(col.search(VECTORS[i], k=3) for i in range(20)))
        assert [hits[0].id for hits in results] == IDS[:20]
        batch = await col.search_batch(VECTORS[:4], k=2)
        assert [hits[0].id for hits in batch] == IDS[:4]
        hybrid = await col.search("cells", k=2, vector=VECTORS[1], mode="hybrid", fusion="rrf")
        assert hybrid[0].id == IDS[1] and hybrid[0].dense_rank == 1 and hybrid[0].lexical_rank is None  # no texts
        assert await col.count() == 1200 and (await col.get([IDS[0]]))[0] is not None
        assert await col.delete([IDS[0]]) == 1
        with pytest.raises(InvalidArgumentError, match="k"):
            await col.search(VECTORS[0], k=0)
        with pytest.raises(NotFoundError):
            await client.get_collection("missing")
        assert await client.list_collections() == ["a"]
        await client.drop_collection("a")


def test_async_embedded(tmp_path: Path) -> None:
    asyncio.run(_exercise(str(tmp_path)))


def test_async_remote(tmp_path: Path) -> None:
    running = RunningServer(tmp_path / "served", api_keys=[ADMIN_KEY])
    try:
        asyncio.run(_exercise(running.url, api_key=ADMIN_KEY))
    finally:
        running.stop()


def test_numpy_query_types_are_accepted_async(tmp_path: Path) -> None:
    async def run() -> None:
        client = await nestvec.aconnect(str(tmp_path))
        col = await client.create_collection("b", encoder=None, dim=384, codec="fp32")
        await col.upsert(["x"], vectors=np.asarray(VECTORS[:1], dtype=np.float64))
        assert (await col.search(VECTORS[0].tolist(), k=1))[0].id == "x"
        await client.close()

    asyncio.run(run())
