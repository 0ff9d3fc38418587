"""Concurrent single searches share turns on the server: each still gets exactly its own answer,
and a bad request fails alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from nestvec.errors import InvalidArgumentError
from realdata import DATA
from servers import RunningServer


def test_concurrent_searches_get_their_own_results(server: RunningServer) -> None:
    base = np.load(DATA / "wiki250k" / "minilm_base150k_fp16.npy", mmap_mode="r")[:3000].astype(np.float32)
    queries = np.load(DATA / "wiki250k" / "minilm_queries_fp16.npy")[:120].astype(np.float32)
    client = server.client()
    col = client.create_collection("w", encoder=None, dim=384, index="spann")
    col.upsert([f"p{i}" for i in range(3000)], vectors=base, metadata=[{"odd": i % 2} for i in range(3000)])
    settings = [{"k": 5}, {"k": 10}, {"k": 10, "filter": {"odd": 1}}, {"k": 10, "nprobe": 8}]
    expected = [[h.id for h in col.search(q, **settings[i % 4])] for i, q in enumerate(queries)]  # type: ignore[arg-type]

    def one(i: int) -> list[str]:
        if i % 10 == 9:  # a bad request in the crowd fails alone
            with pytest.raises(InvalidArgumentError):
                col.search(queries[i][:100], k=10)
            return ["bad"]
        return [h.id for h in col.search(queries[i], **settings[i % 4])]  # type: ignore[arg-type]

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, range(len(queries))))
    for i, ids in enumerate(got):
        assert ids == (["bad"] if i % 10 == 9 else expected[i])
    client.close()
