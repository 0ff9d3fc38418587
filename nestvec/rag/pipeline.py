"""`RAG(collection, generator)`: retrieve from a nestvec collection (embedded or remote), pack the
passages into the generator's context, answer with citations back to passage ids."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Unpack

import numpy as np

from nestvec.client.base import CollectionHandle
from nestvec.encoders import Encoder
from nestvec.errors import NestvecError, invalid
from nestvec.rag.cache import PassageCache
from nestvec.rag.context import Passage, attributed, cited_numbers, pack
from nestvec.rag.generators import DEFAULT_TEMPLATE, Generator, Prompt, check_template
from nestvec.rag.iterative import LoopStats, SpeculationCosts, Speculator, Step, plain_loop, speculative_loop
from nestvec.types import JSONDict, SearchOptions

DEFAULT_K = 5
DEFAULT_MAX_NEW_TOKENS = 200
DEFAULT_PREFETCH = 20  # RaLMSpec's prefetch: extra passages per store call that fill the local cache
RAG_MODE = "hybrid"  # the question is text, passages have texts: fusion beat dense on both test sets


@dataclass
class Answer:
    text: str
    passages: list[Passage]          # what the prompt held (iterative: every passage any step held), in order
    citations: list[str]             # ids of the passages the answer cites, first cited first
    generator: str
    retrieve_s: float
    generate_s: float
    prompt_tokens: int = 0
    stats: LoopStats | None = None   # iterative answers: steps, store calls, speculation
    cited_by: str = "markers"        # "markers": the answer's [n]; "overlap": its sentences' words (no markers)

    def to_json(self) -> JSONDict:
        out: JSONDict = {"text": self.text, "citations": self.citations, "cited_by": self.cited_by,
                         "generator": self.generator,
                         "retrieve_s": round(self.retrieve_s, 4), "generate_s": round(self.generate_s, 4),
                         "passages": [{"id": p.id, "score": p.score, "text": p.text} for p in self.passages]}
        if self.stats is not None:
            out["iterative"] = {k: v for k, v in vars(self.stats).items() if k != "steps_log"}
        return out


def _check_positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(name, f"must be a positive integer, got {value!r}")
    return value


class RAG:
    """Retrieval-augmented answers from one collection.

    Search options (`mode`, `fusion`, `alpha`, `nprobe`, ...) go to every search the pipeline makes;
    the mode defaults to hybrid. `prompt_template` is the user message, with `{context}` (the
    numbered passages) and `{question}` in it.

    Iterative answers ask the store for `prefetch` passages beyond k (the same search in the plain
    and the speculative loop, so both see the same top-k); the speculative loop caches them with
    their vectors and guesses from that cache, using `query_encoder` (default: the collection's
    own encoder, or for a remote collection the same model loaded here when it is available);
    `speculation_cache=False` guesses from the previous step's passages only."""

    def __init__(self, collection: CollectionHandle, generator: Generator, *, k: int = DEFAULT_K,
                 filter: JSONDict | None = None, prompt_template: str = DEFAULT_TEMPLATE,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, prefetch: int = DEFAULT_PREFETCH,
                 query_encoder: Encoder | None = None, speculation_cache: bool = True,
                 **search: Unpack[SearchOptions]) -> None:
        self.collection, self.generator = collection, generator
        self.k = _check_positive(k, "k")
        self.max_new_tokens = _check_positive(max_new_tokens, "max_new_tokens")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise invalid("prefetch", f"must be an integer >= 0, got {prefetch!r}")
        self.prefetch = prefetch
        self.filter, self.template = filter, check_template(prompt_template)
        self.search: SearchOptions = {"mode": RAG_MODE, **search}
        self.speculation_costs = SpeculationCosts()  # measured by each speculative answer, used by the next
        self._query_encoder: Encoder | bool | None = query_encoder if query_encoder is not None else False
        self._store_encoder: Encoder | bool | None = False  # the collection's model here; False: not looked up
        self._alone: dict[str, np.ndarray] = {}  # query text -> its vector embedded on its own
        self.speculation_cache = speculation_cache

    def retrieve_batch(self, queries: Sequence[str]) -> list[list[Passage]]:
        """Top-k passages per query, as the pipeline sees them (ties broken by id in the store)."""
        hits = self.collection.search_batch(list(queries), self.k, self.filter, **self.search)
        return [[Passage.from_hit(h) for h in row] for row in hits]

    def _retrieve_into(self, cache: PassageCache | None) -> Callable[[Sequence[str]], list[list[Passage]]]:
        """Iterative retrieval: top-(k + prefetch), the first k used, all of them cached."""
        def retrieve(queries: Sequence[str]) -> list[list[Passage]]:
            options: SearchOptions = {**self.search, "with_vectors": cache is not None}
            rows = self.collection.search_batch(list(queries), self.k + self.prefetch, self.filter,
                                                vectors=self._embedded_alone(queries), **options)
            out = []
            for row in rows:
                passages = [Passage.from_hit(h) for h in row]
                vectors = [h.vector for h in row]
                if cache is not None and passages and all(v is not None for v in vectors):
                    cache.add(passages, np.stack([v for v in vectors if v is not None]))
                out.append(passages[:self.k])
            return out
        return retrieve

    def query_encoder(self) -> Encoder | None:
        """The encoder that embeds speculation queries like the store embeds them, if one is here."""
        if self._query_encoder is False:
            self._query_encoder = self.store_encoder()
        return self._query_encoder if isinstance(self._query_encoder, Encoder) else None

    def store_encoder(self) -> Encoder | None:
        """The collection's own model, here (embedded, or loaded when a remote collection's weights are here)."""
        if self._store_encoder is False:
            self._store_encoder = _same_encoder(self.collection)
        return self._store_encoder if isinstance(self._store_encoder, Encoder) else None

    def _embedded_alone(self, queries: Sequence[str]) -> np.ndarray | None:
        """Iterative steps' query vectors, each embedded on its own, for the store's dense side.
        Embedding a batch pads its texts to one length, and with bf16 matmuls (or any kernel whose
        blocking follows the batch shape) a query's vector then depends on its batch mates: scores
        moved by ~1e-3, enough to reorder near ties, so a step checked inside a SearchBatch could
        get other passages than the plain loop's single search. None: the store embeds them."""
        encoder = self.store_encoder() if self.search.get("mode") != "lexical" else None
        if encoder is None:
            return None
        return np.stack([self._embed_alone(query, encoder) for query in queries])

    def _embed_alone(self, query: str, encoder: Encoder) -> np.ndarray:
        """One query's vector; the store encoder's are kept (the speculator and the store check
        embed the same step queries)."""
        if encoder is not self.store_encoder():
            return encoder.encode(query, kind="query")
        if len(self._alone) > 4096:  # one answer's queries are a few dozen; keep the memo bounded
            self._alone.clear()
        if query not in self._alone:
            self._alone[query] = encoder.encode(query, kind="query")
        return self._alone[query]

    def _cache_speculator(self, cache: PassageCache, encoder: Encoder) -> Speculator:
        def guess(query: str) -> list[Passage]:
            return cache.top_k(self._embed_alone(query, encoder), self.k) if len(cache) else []
        return guess

    def retrieve(self, question: str) -> list[Passage]:
        return self.retrieve_batch([question])[0]

    def _pack(self, question: str, passages: Sequence[Passage]) -> tuple[Prompt, list[Passage]]:
        return pack(question, passages, self.generator, self.max_new_tokens, self.template)

    def answer(self, question: str) -> Answer:
        """Retrieve once, then generate the whole answer."""
        if not isinstance(question, str) or not question.strip():
            raise invalid("question", "must be a non-empty string")
        start = time.perf_counter()
        passages = self.retrieve(question)
        retrieve_s = time.perf_counter() - start
        prompt, packed = self._pack(question, passages)
        start = time.perf_counter()
        text = self.generator.generate(prompt, self.max_new_tokens)
        generate_s = time.perf_counter() - start
        cited, by = _citations(text, [Step(packed, len(text))], packed)
        return Answer(text, packed, cited, self.generator.name, retrieve_s, generate_s,
                      self.generator.prompt_tokens(prompt), cited_by=by)

    def answer_iterative(self, question: str, *, stride: int = 16, query_words: int = 32,
                         speculative: bool = True, window: int = 4, overlap: bool = True,
                         policy: str = "auto") -> Answer:
        """Retrieve again every `stride` tokens with the question and the answer's last
        `query_words` words. `speculative` (RaLMSpec) gives the same text, waiting less for the
        store where that pays (`policy` "auto"; "always" speculates every step): see
        nestvec.rag.iterative."""
        if not isinstance(question, str) or not question.strip():
            raise invalid("question", "must be a non-empty string")
        _check_positive(stride, "stride")
        _check_positive(window, "window")
        kwargs: dict[str, Any] = {"stride": stride, "max_new_tokens": self.max_new_tokens, "query_words": query_words}
        if speculative:
            encoder = self.query_encoder() if self.speculation_cache else None
            cache = PassageCache(encoder.dim) if encoder is not None else None
            speculators = {"cache": self._cache_speculator(cache, encoder)} if cache is not None and encoder else {}
            draft, stats = speculative_loop(question, self._retrieve_into(cache), lambda p: self._pack(question, p),
                                            self.generator, window=window, overlap=overlap, policy=policy,
                                            costs=self.speculation_costs, speculators=speculators, **kwargs)
        else:
            draft, stats = plain_loop(question, self._retrieve_into(None), lambda p: self._pack(question, p),
                                      self.generator, **kwargs)
        used: dict[str, Passage] = {}
        for step in stats.steps_log:
            for passage in step.passages:
                used.setdefault(passage.id, passage)
        cited, by = _citations(draft.text, stats.steps_log, list(used.values()))
        return Answer(draft.text, list(used.values()), cited, self.generator.name, stats.retrieve_s, stats.generate_s,
                      stats=stats, cited_by=by)


def _same_encoder(collection: CollectionHandle) -> Encoder | None:
    """The collection's encoder (embedded), or the model a remote collection names, loaded here
    when its weights are here too; None for raw-vector collections and unknown models."""
    try:
        own = getattr(collection, "encoder", None)  # an embedded collection's property raises without one
    except NestvecError:
        return None
    if isinstance(own, Encoder):
        return own
    identity = collection.info().get("encoder")
    if not identity:
        return None
    from nestvec.encoders import load_encoder

    try:
        encoder = load_encoder(str(identity["model"]), layers=identity.get("layers"))
    except NestvecError:
        return None  # a model that is not on this machine: guess from the previous step only
    return encoder if encoder.identity.weights_sha256 == identity.get("weights_sha256") else None


def _citations(text: str, steps: Sequence[Step], passages: Sequence[Passage]) -> tuple[list[str], str]:
    """The answer's [n] markers, each resolved against the passages of the step that wrote it;
    without any, the passages its sentences copy from (context.attributed)."""
    found: dict[str, None] = {}
    for position, number in cited_numbers(text):
        step = next((s for s in steps if position < s.end), steps[-1] if steps else None)
        if step is not None and 1 <= number <= len(step.passages):
            found[step.passages[number - 1].id] = None
    if found:
        return list(found), "markers"
    return attributed(text, passages), "overlap"
