"""LangChain VectorStore adapter: langchain-tests' standard suite on both transports, plus our own checks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_tests.integration_tests import VectorStoreIntegrationTests

import nestvec
from nestvec.client.base import ClientBase
from nestvec.client.remote import RemoteClient
from nestvec.datasets import iter_corpus
from nestvec.integrations.langchain import NestvecVectorStore
from realdata import DATA, shipped_embeddings

# The standard suite's async tests carry no asyncio mark and pytest-asyncio (strict mode) runs only
# marked coroutines; marking the whole class makes it warn once per sync test, which we silence.
STANDARD_SUITE_MARKS = [
    pytest.mark.asyncio,
    pytest.mark.filterwarnings("ignore:The test .* is marked with '@pytest.mark.asyncio':pytest.PytestWarning"),
]


class TestEmbeddedStandard(VectorStoreIntegrationTests):
    pytestmark = STANDARD_SUITE_MARKS

    @pytest.fixture()
    def vectorstore(self, local_root: Path) -> Iterator[VectorStore]:
        client = nestvec.connect(local_root)
        store = NestvecVectorStore(client, "langchain", self.get_embeddings())
        try:
            yield store
        finally:
            store.delete_collection()
            client.close()


class TestRemoteStandard(VectorStoreIntegrationTests):
    pytestmark = STANDARD_SUITE_MARKS

    @pytest.fixture()
    def vectorstore(self, remote_client: RemoteClient) -> Iterator[VectorStore]:
        # One server per module: a fresh collection name keeps every test's store empty.
        store = NestvecVectorStore(remote_client, f"lc-{uuid.uuid4().hex}", self.get_embeddings())
        try:
            yield store
        finally:
            store.delete_collection()


COMPASS_VECTORS = {"north": [1.0, 0.0], "east": [0.0, 1.0], "south": [-1.0, 0.0], "north-east": [1.0, 1.0],
                   "nowhere": [0.0, 0.0]}


class CompassEmbeddings(Embeddings):
    """2-d vectors with known cosines: north.north = 1, north.east = 0, north.south = -1."""

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [COMPASS_VECTORS[t] for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return COMPASS_VECTORS[text]


@pytest.fixture(params=["embedded", "remote"])
def store(request: pytest.FixtureRequest, local_root: Path) -> Iterator[NestvecVectorStore]:
    """An empty compass store on either transport (the remote client is closed by its own fixture)."""
    local = request.param == "embedded"
    client: ClientBase = nestvec.connect(local_root) if local else request.getfixturevalue("remote_client")
    vs = NestvecVectorStore(client, f"lc-{uuid.uuid4().hex}", CompassEmbeddings())
    yield vs
    vs.delete_collection()
    if local:
        client.close()


COMPASS = ["north", "east", "south", "north-east"]
META = [{"kind": "cardinal", "deg": 0}, {"kind": "cardinal", "deg": 90}, {"kind": "cardinal", "deg": 180},
        {"kind": "ordinal", "deg": 45}]


def test_metadata_filter_passes_through(store: NestvecVectorStore) -> None:
    store.add_texts(COMPASS, META, ids=COMPASS)
    assert [d.id for d in store.similarity_search("north", k=4, filter={"kind": "ordinal"})] == ["north-east"]
    got = store.similarity_search_with_score("north", k=4, filter={"deg": {"$gte": 90}})
    assert [(d.id, round(s, 5)) for d, s in got] == [("east", 0.0), ("south", -1.0)]
    either = {"$or": [{"deg": {"$lt": 10}}, {"kind": {"$in": ["ordinal"]}}]}
    assert [d.id for d in store.similarity_search_by_vector([0.0, 1.0], k=4, filter=either)] == ["north-east", "north"]


def test_filter_on_a_field_no_document_has_matches_nothing(store: NestvecVectorStore) -> None:
    assert store.similarity_search("north", k=2, filter={"owner": "alice"}) == []  # no collection yet
    store.add_texts(COMPASS, META, ids=COMPASS)
    assert store.similarity_search("north", k=4, filter={"owner": "alice"}) == []
    assert store.similarity_search("north", k=4, filter={"owner": {"$ne": "alice"}}) == []
    assert store.similarity_search("north", k=4, filter={"$and": [{"owner": "alice"}, {"deg": 0}]}) == []
    hits = store.similarity_search("north", k=4, filter={"$or": [{"owner": "alice"}, {"deg": 0}]})
    assert [d.id for d in hits] == ["north"]


def test_malformed_filters_still_raise(store: NestvecVectorStore) -> None:
    store.add_texts(COMPASS, META, ids=COMPASS)
    with pytest.raises(nestvec.InvalidArgumentError):
        store.similarity_search("north", k=2, filter={"deg": {"$near": 1}})
    with pytest.raises(nestvec.InvalidArgumentError):
        store.similarity_search("north", k=2, filter={"owner": {"$near": 1}})
    with pytest.raises(nestvec.InvalidArgumentError):
        store.similarity_search("north", k=2, filter={"$or": []})


def test_relevance_scores_map_cosine_onto_unit_interval(store: NestvecVectorStore) -> None:
    store.add_texts(COMPASS, ids=COMPASS)
    got = store.similarity_search_with_relevance_scores("north", k=4)
    assert [d.id for d, _ in got] == ["north", "north-east", "east", "south"]
    assert [s for _, s in got] == pytest.approx([1.0, (1 + 0.5**0.5) / 2, 0.5, 0.0], abs=1e-6)
    assert all(0.0 <= s <= 1.0 for _, s in got)
    above = store.similarity_search_with_relevance_scores("north", k=4, score_threshold=0.5)
    assert [d.id for d, _ in above] == ["north", "north-east", "east"]


def test_generated_ids_fill_gaps_and_zero_vectors_are_refused(store: NestvecVectorStore) -> None:
    ids = store.add_texts(["north", "east"], ids=["n", None])
    assert ids[0] == "n" and uuid.UUID(ids[1]).version == 4
    assert [d.page_content for d in store.get_by_ids([ids[1], "missing", ids[1]])] == ["east"]
    with pytest.raises(ValueError, match="zero vector"):
        store.add_texts(["nowhere"])
    with pytest.raises(ValueError, match="delete_collection"):
        store.delete()


@pytest.mark.parametrize("transport", ["embedded", "remote"])
def test_from_texts_opens_and_owns_its_client(transport: str, request: pytest.FixtureRequest,
                                              local_root: Path) -> None:
    extra = {"api_key": request.getfixturevalue("api_key")} if transport == "remote" else {}
    target = request.getfixturevalue("server_url") if transport == "remote" else str(local_root)
    name = f"lc-{uuid.uuid4().hex}"
    vs = NestvecVectorStore.from_texts(COMPASS, CompassEmbeddings(), META, ids=COMPASS, target=target,
                                       collection_name=name, **extra)
    try:
        assert [d.id for d in vs.similarity_search_by_vector([-1.0, 0.1], k=1)] == ["south"]
        assert vs.client.get_collection(name).info()["codec"] == "fp32"
    finally:
        vs.delete_collection()
        vs.close()


class ShippedEmbeddings(Embeddings):
    """SciFact's shipped MiniLM vectors: a document's, and for a query taken from a document, that document's."""

    def __init__(self, texts: list[str], vectors: np.ndarray) -> None:
        self.by_prefix = {t[:60]: v for t, v in zip(texts, vectors, strict=True)}
        self.query_calls = 0

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.by_prefix[t[:60]].tolist() for t in texts]

    def embed_query(self, text: str) -> list[float]:
        self.query_calls += 1
        return self.by_prefix[text[:60]].tolist()


@pytest.mark.parametrize("transport", ["embedded", "remote"])
def test_hybrid_and_lexical_modes_through_the_store(transport: str, request: pytest.FixtureRequest,
                                                    local_root: Path) -> None:
    ids, vectors = shipped_embeddings("scifact")
    corpus = {d.id: d.text for d in iter_corpus(DATA / "scifact" / "corpus.jsonl")}
    texts = [corpus[i] for i in ids[:200]]
    embeddings = ShippedEmbeddings(texts, vectors[:200])
    client: ClientBase = nestvec.connect(local_root) if transport == "embedded" else \
        request.getfixturevalue("remote_client")
    store = NestvecVectorStore(client, f"lc-{uuid.uuid4().hex}", embeddings, mode="hybrid")
    try:
        store.add_texts(texts, [{"half": i % 2} for i in range(200)], ids=ids[:200])
        query = texts[11][:60]
        hybrid = store.similarity_search_with_score(query, k=3)
        assert hybrid[0][0].id == ids[11] and hybrid[0][1] == pytest.approx(1.0)  # first on both sides
        relevance = store.similarity_search_with_relevance_scores(query, k=3, fusion="rrf")
        assert relevance[0][0].id == ids[11] and relevance[0][1] == pytest.approx(1.0)
        assert all(0.0 <= s <= 1.0 for _, s in relevance)
        before = embeddings.query_calls
        lexical = store.similarity_search(query, k=3, mode="lexical", filter={"half": 1})
        assert lexical[0].id == ids[11] and embeddings.query_calls == before  # BM25 alone embeds nothing
        assert next(d.id for d in store.similarity_search(query, k=3, mode="lexical", filter={"half": 0})) != ids[11]
        retriever = store.as_retriever(search_kwargs={"k": 2, "mode": "hybrid", "alpha": 0.3})
        assert retriever.invoke(texts[12][:60])[0].id == ids[12]
        dense = store.similarity_search_by_vector(vectors[13].tolist(), k=1, mode="dense")
        assert dense[0].id == ids[13]
        with pytest.raises(ValueError, match="query text"):
            store.similarity_search_by_vector(vectors[13].tolist(), k=1)  # the store's mode is hybrid
        with pytest.raises(nestvec.InvalidArgumentError, match="alpha"):
            store.similarity_search(query, k=1, alpha=2.0)
        with pytest.raises(TypeError, match="alfa"):
            store.similarity_search(query, k=1, alfa=0.2)
    finally:
        store.delete_collection()
        if transport == "embedded":
            client.close()
