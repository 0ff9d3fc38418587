"""`RAG(collection, generator)`: retrieve from a nestvec collection (embedded or remote), pack the
passages into the generator's context, answer with citations back to passage ids."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Unpack

from nestvec.client.base import CollectionHandle
from nestvec.errors import invalid
from nestvec.rag.context import Passage, attributed, cited_numbers, pack
from nestvec.rag.generators import DEFAULT_TEMPLATE, Generator, Prompt, check_template
from nestvec.rag.iterative import LoopStats, SpeculationCosts, Step, plain_loop, speculative_loop
from nestvec.types import JSONDict, SearchOptions

DEFAULT_K = 5
DEFAULT_MAX_NEW_TOKENS = 200
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
    numbered passages) and `{question}` in it."""

    def __init__(self, collection: CollectionHandle, generator: Generator, *, k: int = DEFAULT_K,
                 filter: JSONDict | None = None, prompt_template: str = DEFAULT_TEMPLATE,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **search: Unpack[SearchOptions]) -> None:
        self.collection, self.generator = collection, generator
        self.k = _check_positive(k, "k")
        self.max_new_tokens = _check_positive(max_new_tokens, "max_new_tokens")
        self.filter, self.template = filter, check_template(prompt_template)
        self.search: SearchOptions = {"mode": RAG_MODE, **search}
        self.speculation_costs = SpeculationCosts()  # measured by each speculative answer, used by the next

    def retrieve_batch(self, queries: Sequence[str]) -> list[list[Passage]]:
        """Top-k passages per query, as the pipeline sees them (ties broken by id in the store)."""
        hits = self.collection.search_batch(list(queries), self.k, self.filter, **self.search)
        return [[Passage.from_hit(h) for h in row] for row in hits]

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
            draft, stats = speculative_loop(question, self.retrieve_batch, lambda p: self._pack(question, p),
                                            self.generator, window=window, overlap=overlap, policy=policy,
                                            costs=self.speculation_costs,
                                            **kwargs)
        else:
            draft, stats = plain_loop(question, self.retrieve_batch, lambda p: self._pack(question, p),
                                      self.generator, **kwargs)
        used: dict[str, Passage] = {}
        for step in stats.steps_log:
            for passage in step.passages:
                used.setdefault(passage.id, passage)
        cited, by = _citations(draft.text, stats.steps_log, list(used.values()))
        return Answer(draft.text, list(used.values()), cited, self.generator.name, stats.retrieve_s, stats.generate_s,
                      stats=stats, cited_by=by)


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
