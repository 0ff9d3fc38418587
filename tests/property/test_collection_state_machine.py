"""Stateful property test (after chroma): random upserts, deletes, reopens, checked against a model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import nestvec
from realdata import shipped_embeddings

_IDS, _VECTORS = shipped_embeddings("scifact")
POOL = _VECTORS[:400]
ID_SPACE = [f"d{i}" for i in range(60)]


class CollectionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp())
        self.client = nestvec.connect(self.root)
        self.col = self.client.create_collection("p", encoder=None, dim=384, codec="fp32")
        self.model: dict[str, tuple[int, dict]] = {}

    def teardown(self) -> None:
        self.client.close()
        shutil.rmtree(self.root, ignore_errors=True)

    @rule(ids=st.lists(st.sampled_from(ID_SPACE), min_size=1, max_size=12, unique=True),
          rows=st.lists(st.integers(0, len(POOL) - 1), min_size=12, max_size=12),
          tag=st.integers(0, 3))
    def upsert(self, ids: list[str], rows: list[int], tag: int) -> None:
        picked = rows[: len(ids)]
        self.col.upsert(ids, vectors=POOL[picked], texts=[f"{i}:{r}" for i, r in zip(ids, picked, strict=True)],
                        metadata=[{"tag": tag}] * len(ids))
        self.model.update({i: (r, {"tag": tag}) for i, r in zip(ids, picked, strict=True)})

    @rule(ids=st.lists(st.sampled_from(ID_SPACE), min_size=1, max_size=8, unique=True))
    def delete(self, ids: list[str]) -> None:
        assert self.col.delete(ids) == len([i for i in ids if i in self.model])
        for i in ids:
            self.model.pop(i, None)

    @rule()
    def reopen(self) -> None:
        self.client.close()
        self.client = nestvec.connect(self.root)
        self.col = self.client.get_collection("p")

    @precondition(lambda self: bool(self.model))
    @rule(q=st.integers(0, len(POOL) - 1), k=st.integers(1, 15), tag=st.none() | st.integers(0, 3))
    def search(self, q: int, k: int, tag: int | None) -> None:
        live = [(i, r) for i, (r, m) in self.model.items() if tag is None or m["tag"] == tag]
        if tag is not None and not any(m["tag"] == tag for _, m in self.model.values()):
            return
        hits = self.col.search(POOL[q], k=k, filter=None if tag is None else {"tag": tag})
        scores = {i: float(POOL[r] @ POOL[q]) for i, r in live}
        expected = sorted(scores.values(), reverse=True)[:k]
        assert len(hits) == min(k, len(live))
        assert len({h.id for h in hits}) == len(hits)
        # compare scores with a tolerance: equal vectors under different ids tie
        assert np.allclose([h.score for h in hits], expected, atol=1e-5)
        assert all(abs(scores[h.id] - h.score) < 1e-5 for h in hits)

    @invariant()
    def count_and_contents_match(self) -> None:
        assert self.col.count() == len(self.model)
        records = self.col.get(ID_SPACE)
        for key, record in zip(ID_SPACE, records, strict=True):
            if key in self.model:
                assert record is not None and record.text == f"{key}:{self.model[key][0]}"
                assert record.metadata == self.model[key][1]
            else:
                assert record is None


TestCollectionStateMachine = CollectionMachine.TestCase
TestCollectionStateMachine.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
