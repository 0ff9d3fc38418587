"""LangChain `VectorStore` backed by a nestvec collection, embedded or over gRPC (one client API for both).

LangChain embeds texts with its own `Embeddings` object, so the collection stores raw vectors
(`encoder=None`). Its dimension is only known once the first batch is embedded, so the collection is
created lazily on the first write; until then the store simply reads as empty.

Scores are nestvec's: cosine similarity in [-1, 1], higher is better (vectors are L2-normalised on
insert). `similarity_search_with_relevance_scores` maps them linearly onto [0, 1].

`mode="hybrid"` (on the store, or per search: `similarity_search(q, mode="hybrid")`, or a retriever's
`search_kwargs`) fuses BM25 over the stored texts with the dense side, which the store's embedding
function makes; `mode="lexical"` needs no embedding at all.

This module needs the `langchain` extra (`pip install nestvec[langchain]`); nothing else in nestvec
imports it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self, TypeVar

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

import nestvec
from nestvec.client.base import ClientBase, CollectionHandle
from nestvec.errors import InvalidArgumentError, NotFoundError
from nestvec.index.filters import OPERATORS
from nestvec.index.fusion import DEFAULT_ALPHA, DEFAULT_FUSION, DEFAULT_MODE, DEFAULT_RRF_K, check_fusion
from nestvec.types import Hit, JSONDict, Record, SearchOptions

__all__ = ["DEFAULT_CODEC", "DEFAULT_COLLECTION", "NestvecVectorStore"]

DEFAULT_COLLECTION = "langchain"
# Exact scores by default: LangChain users compare scores against thresholds, and the standard
# tests compare rankings of near-identical fake vectors. Pass codec="fp8" etc. to compress.
DEFAULT_CODEC = "fp32"

T = TypeVar("T")
SEARCH_KEYWORDS = ("mode", "fusion", "rrf_k", "alpha", "nprobe")


def _cosine_relevance(score: float) -> float:
    """Cosine similarity [-1, 1] -> relevance [0, 1] (clamped: fp32 dot products can overshoot 1 by an ulp).

    LangChain's built-in `_cosine_relevance_score_fn` expects a cosine *distance* (1 - similarity);
    nestvec returns the similarity itself, so using it would turn the best match into relevance 0.
    """
    return min(1.0, max(0.0, (1.0 + score) / 2.0))


def _is_field_condition(condition: Any) -> bool:
    """A well-formed condition on one field: a bare value ($eq) or a non-empty dict of known operators."""
    if not isinstance(condition, dict):
        return True
    return bool(condition) and all(op in OPERATORS for op in condition)


def _is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _drop_absent_fields(spec: JSONDict, fields: set[str]) -> JSONDict | None:
    """The filter with conditions on fields no stored document has resolved, or None if it can match nothing.

    nestvec rejects a filter naming an unknown field (it catches typos), but LangChain callers routinely
    filter a store that is empty or not yet populated with that field (a retriever with a fixed
    `{"user": ...}` filter, say). Every nestvec operator, $ne and $nin included, is false for a document
    lacking the field, so such a condition is simply false: an AND containing it matches nothing and an
    OR drops it. The answer is exactly what nestvec would return once any document had the field.
    Malformed parts are kept as they are, so nestvec still reports them.
    """
    out: JSONDict = {}
    for key, value in spec.items():
        if key in ("$and", "$or") and _is_filter_list(value):
            parts = [_drop_absent_fields(v, fields) for v in value]
            kept = [p for p in parts if p is not None]
            if (key == "$and" and len(kept) < len(parts)) or not kept:
                return None
            out[key] = kept
        elif isinstance(key, str) and not key.startswith("$") and key not in fields and _is_field_condition(value):
            return None
        else:
            out[key] = value
    return out


def _relevance(options: SearchOptions) -> Callable[[float], float]:
    """Dense: cosine mapped linearly; weighted fusion is already in [0, 1]; RRF divided by its
    largest possible value (first on both sides); BM25, unbounded, squashed by s / (1 + s)."""
    mode, fusion = options.get("mode", "dense"), options.get("fusion", DEFAULT_FUSION)
    if mode == "dense":
        return _cosine_relevance
    if mode == "lexical":
        return lambda score: score / (1.0 + score)
    if fusion == "rrf":
        best = 2.0 / (options.get("rrf_k", DEFAULT_RRF_K) + 1)
        return lambda score: min(1.0, score / best)
    return lambda score: min(1.0, max(0.0, score))


def _document(item: Hit | Record) -> Document:
    return Document(id=item.id, page_content=item.text or "", metadata=dict(item.metadata))


def _reject_extra(kwargs: dict[str, Any]) -> None:
    """Fail loudly on options this store does not know, rather than silently ignore a misspelt `filter`."""
    if kwargs:
        raise TypeError(f"NestvecVectorStore got unexpected keyword arguments: {sorted(kwargs)}")


class NestvecVectorStore(VectorStore):
    """A LangChain vector store over one nestvec collection of raw (caller-embedded) vectors.

    `client` is anything `nestvec.connect()` returns (embedded folder or `grpc://` server). The collection
    is created on the first write with `encoder=None`, the embedding dimension and `codec`.

    Zero vectors are rejected (nestvec's InvalidArgumentError, a ValueError): the cosine of a zero vector
    is undefined, and inventing a direction for it would return arbitrary neighbours. Real embedding
    models, and LangChain's fake ones (Gaussian samples), do not produce them.
    """

    def __init__(self, client: ClientBase, collection_name: str, embedding: Embeddings, *,
                 codec: str = DEFAULT_CODEC, mode: str = DEFAULT_MODE, owns_client: bool = False) -> None:
        check_fusion(mode, DEFAULT_FUSION, DEFAULT_RRF_K, DEFAULT_ALPHA)
        self.mode = mode  # the default search mode: "dense", "lexical" or "hybrid"
        self.client = client
        self.collection_name = collection_name
        self.codec = codec
        self._embedding = embedding
        self._owns_client = owns_client
        self._collection: CollectionHandle | None = None
        # LangChain's async methods run the sync ones on executor threads: guard the lazy handle.
        self._lock = threading.Lock()

    @property
    def embeddings(self) -> Embeddings:
        return self._embedding

    # -- the collection handle ----------------------------------------------------------------
    def _existing(self) -> CollectionHandle | None:
        """The collection if it exists yet (None reads as an empty store)."""
        with self._lock:
            if self._collection is None:
                try:
                    self._collection = self.client.get_collection(self.collection_name)
                except NotFoundError:
                    return None
            return self._collection

    def _writable(self, dim: int) -> CollectionHandle:
        """The collection, created for `dim`-d raw vectors if missing (exist_ok: another writer may race us)."""
        with self._lock:
            if self._collection is None:
                self._collection = self.client.create_collection(
                    self.collection_name, encoder=None, dim=dim, codec=self.codec, exist_ok=True)
            return self._collection

    def _forget(self) -> None:
        with self._lock:
            self._collection = None

    def _read(self, op: Callable[[CollectionHandle], T], empty: T) -> T:
        """Run a read; a missing collection (never written, or dropped elsewhere) reads as empty."""
        handle = self._existing()
        if handle is None:
            return empty
        try:
            return op(handle)
        except NotFoundError:
            self._forget()
            return empty

    # -- writes --------------------------------------------------------------------------------
    def add_texts(self, texts: Iterable[str], metadatas: list[dict[str, Any]] | None = None, *,
                  ids: Sequence[str | None] | None = None, **kwargs: Any) -> list[str]:
        """Embed and upsert; existing ids are replaced. Ids that are None get a fresh uuid4."""
        _reject_extra(kwargs)
        texts = list(texts)
        if metadatas is not None and len(metadatas) != len(texts):
            raise ValueError(f"got {len(metadatas)} metadatas for {len(texts)} texts")
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"got {len(ids)} ids for {len(texts)} texts")
        given: Sequence[str | None] = ids if ids is not None else [None] * len(texts)
        keys = [str(uuid.uuid4()) if i is None else i for i in given]
        if not texts:
            return []
        vectors = np.asarray(self._embedding.embed_documents(texts), dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise ValueError(f"the embeddings returned shape {vectors.shape} for {len(texts)} texts")

        def write() -> None:
            self._writable(int(vectors.shape[1])).upsert(keys, texts=texts, vectors=vectors, metadata=metadatas)

        try:
            write()
        except NotFoundError:  # dropped behind our back since we cached the handle: recreate once
            self._forget()
            write()
        return keys

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete by id; unknown ids are ignored. `ids=None` (LangChain's "delete all") is refused.

        Deleting everything would mean dropping the collection, which may have been created elsewhere
        with its own codec: call `delete_collection()` to say so explicitly.
        """
        _reject_extra(kwargs)
        if ids is None:
            raise ValueError("pass the ids to delete; use delete_collection() to remove everything")
        unique = list(dict.fromkeys(ids))  # nestvec rejects duplicate ids in one request
        if unique:
            self._read(lambda h: h.delete(unique), 0)
        return True

    def delete_collection(self) -> None:
        """Drop the whole collection (it is recreated on the next write)."""
        self._forget()
        with contextlib.suppress(NotFoundError):
            self.client.drop_collection(self.collection_name)

    def close(self) -> None:
        """Close the client if this store opened it (`from_texts(..., target=...)`)."""
        if self._owns_client:
            self.client.close()

    # -- reads ---------------------------------------------------------------------------------
    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """Documents for the ids that exist, in request order; missing ids are skipped."""
        unique = list(dict.fromkeys(ids))
        if not unique:
            return []
        records: list[Record | None] = self._read(lambda h: h.get(unique), [])
        return [_document(r) for r in records if r is not None]

    def _search(self, handle: CollectionHandle, query: str | np.ndarray, vector: np.ndarray | None, k: int,
                flt: JSONDict | None, options: SearchOptions) -> list[Hit]:
        try:
            return handle.search(query, k=k, filter=flt, vector=vector, **options)
        except InvalidArgumentError:
            if not isinstance(flt, dict):
                raise
            fields = set(handle.info().get("metadata_fields", []))
            resolved = _drop_absent_fields(flt, fields)
            if resolved is None:
                return []
            if resolved == flt:  # the error was about something else
                raise
            return handle.search(query, k=k, filter=resolved, vector=vector, **options)

    def _options(self, kwargs: dict[str, Any]) -> SearchOptions:
        """The store's search settings, overridden per call by `mode=`, `fusion=`, `alpha=`,
        `rrf_k=` or `nprobe=` (so `as_retriever(search_kwargs={"mode": "hybrid"})` works)."""
        options = SearchOptions(mode=self.mode)
        for key in SEARCH_KEYWORDS:
            if key in kwargs:
                options[key] = kwargs.pop(key)  # type: ignore[literal-required]
        _reject_extra(kwargs)
        return options

    def _hits(self, text: str | None, embedding: Sequence[float] | None, k: int, flt: JSONDict | None,
              options: SearchOptions) -> list[Hit]:
        mode = options.get("mode", "dense")
        vector = None if embedding is None else np.asarray(embedding, dtype=np.float32)
        if mode == "dense":
            assert vector is not None
            return self._read(lambda h: self._search(h, vector, None, k, flt, options), [])
        if text is None:
            raise ValueError(f"mode={mode!r} needs the query text: call similarity_search, not ..._by_vector")
        return self._read(lambda h: self._search(h, text, vector, k, flt, options), [])

    def similarity_search_with_score_by_vector(self, embedding: Sequence[float], k: int = 4,
                                               filter: JSONDict | None = None,
                                               **kwargs: Any) -> list[tuple[Document, float]]:
        """Top-k (document, cosine similarity) pairs, best first; `filter` is a nestvec (Mongo-style) filter."""
        hits = self._hits(None, embedding, k, filter, self._options(kwargs))
        return [(_document(hit), hit.score) for hit in hits]

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score_by_vector(embedding, k, **kwargs)]

    def similarity_search_with_score(self, query: str, k: int = 4, filter: JSONDict | None = None,
                                     **kwargs: Any) -> list[tuple[Document, float]]:
        """Scores: cosine similarity in [-1, 1] in dense mode, BM25 in lexical mode, the fused score
        in hybrid mode (weighted: [0, 1]); higher is better."""
        options = self._options(kwargs)
        embedding = None if options.get("mode") == "lexical" else self._embedding.embed_query(query)
        return [(_document(hit), hit.score) for hit in self._hits(query, embedding, k, filter, options)]

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, **kwargs)]

    def _similarity_search_with_relevance_scores(self, query: str, k: int = 4,
                                                 **kwargs: Any) -> list[tuple[Document, float]]:
        """Each mode's score mapped onto [0, 1], higher is better (see `_relevance`)."""
        options = self._options(dict(kwargs))
        relevance = _relevance(options)
        return [(doc, relevance(score)) for doc, score in self.similarity_search_with_score(query, k, **kwargs)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return _cosine_relevance

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings, metadatas: list[dict[str, Any]] | None = None,
                   *, ids: list[str] | None = None, client: ClientBase | None = None,
                   target: str | os.PathLike[str] | None = None, collection_name: str = DEFAULT_COLLECTION,
                   codec: str = DEFAULT_CODEC, mode: str = DEFAULT_MODE, **kwargs: Any) -> Self:
        """A store filled with `texts`, on `client` or on `nestvec.connect(target, **kwargs)` (then owned).

        Extra keyword arguments go to `connect` (e.g. `api_key=` for a grpc:// target).
        """
        if (client is None) == (target is None):
            raise TypeError("from_texts needs exactly one of client= or target=")
        owns = client is None
        if client is None:
            assert target is not None
            client = nestvec.connect(target, **kwargs)
        else:
            _reject_extra(kwargs)
        store = cls(client, collection_name, embedding, codec=codec, mode=mode, owns_client=owns)
        try:
            store.add_texts(texts, metadatas, ids=ids)
        except BaseException:
            store.close()
            raise
        return store
