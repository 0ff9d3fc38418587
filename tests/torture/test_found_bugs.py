"""Regression tests for bugs the torture harness found (bench/torture.py), one per bug."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import nestvec
from realdata import shipped_embeddings


@pytest.mark.parametrize("codec", ["fp8", "fp8e5m2", "binary"])
@pytest.mark.parametrize("index", ["flat", "spann"])
def test_codecs_faiss_cannot_read_accept_writes_after_a_search(tmp_path: Path, codec: str, index: str) -> None:
    """Found by the crash workload after a codec switch to fp8: the flat scan marks a codec faiss
    cannot read with False, and the next append called False.add_sa_codes (AttributeError), so
    every upsert after the first search failed on fp8 and binary collections."""
    ids, vectors = shipped_embeddings("scifact")
    collection = nestvec.connect(tmp_path).create_collection("c", encoder=None, dim=384, codec=codec, index=index)
    collection.upsert(ids[:1500], vectors=vectors[:1500])
    assert collection.search(vectors[0], k=1)[0].id == ids[0]
    collection.upsert(ids[1500:1600], vectors=vectors[1500:1600])  # raised before the fix
    assert collection.count() == 1600
    assert collection.search(vectors[1550], k=1)[0].id == ids[1550]
    assert np.isfinite(collection.search(vectors[1599], k=3)[0].score)
