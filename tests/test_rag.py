"""RAG end to end on a real SciFact slice with a tiny causal LM built here from a config (random
weights, nothing downloaded): token budgeting, citations, iterative retrieval, and speculative
retrieval giving exactly the plain loop's output under greedy decoding."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from tinylm import tiny_llama

import nestvec
from nestvec.datasets import iter_corpus
from nestvec.errors import InvalidArgumentError
from nestvec.rag import RAG, OpenAIGenerator, TransformersGenerator
from nestvec.rag.cache import PassageCache
from nestvec.rag.context import Passage, attributed, pack
from nestvec.rag.generators import Draft, Generator, Prompt
from nestvec.rag.iterative import LoopStats, SpeculationCosts, plain_loop, speculative_loop
from realdata import DATA, shipped_embeddings

N = 400


@pytest.fixture(scope="module")
def tiny_lm() -> TransformersGenerator:
    return tiny_llama()


@pytest.fixture(scope="module")
def scifact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    ids, vectors = shipped_embeddings("scifact")
    texts = {d.id: d.text for d in iter_corpus(DATA / "scifact" / "corpus.jsonl")}
    client = nestvec.connect(tmp_path_factory.mktemp("rag"))
    col = client.create_collection("s", encoder=None, dim=384, codec="int8")
    col.upsert(ids[:N], vectors=np.ascontiguousarray(vectors[:N]), texts=[texts[i] for i in ids[:N]],
               metadata=[{"half": i % 2} for i in range(N)])
    yield col
    client.close()


QUESTIONS = ["Does vitamin D supplementation reduce fractures in the elderly?",
             "Which genes control cell differentiation in the developing brain?",
             "Is obesity a risk factor for type 2 diabetes?"]


def test_answer_packs_within_the_budget_and_returns_scored_passages(scifact: Any,
                                                                    tiny_lm: TransformersGenerator) -> None:
    rag = RAG(scifact, tiny_lm, k=8, max_new_tokens=24, mode="lexical")
    answer = rag.answer(QUESTIONS[0])
    hits = scifact.search(QUESTIONS[0], k=8, mode="lexical")
    # the abstracts are long: the 488-token prompt budget holds only the first few, the last one cut
    assert 1 <= len(answer.passages) < 8
    assert [p.id for p in answer.passages] == [h.id for h in hits[:len(answer.passages)]]
    assert [p.score for p in answer.passages] == pytest.approx([h.score for h in hits[:len(answer.passages)]])
    assert answer.prompt_tokens <= tiny_lm.context_tokens - 24
    assert answer.passages[-1].text == hits[len(answer.passages) - 1].text  # Passage keeps the full text
    assert set(answer.citations) <= {p.id for p in answer.passages}
    assert answer.generator == "tiny-llama" and answer.generate_s > 0 and answer.retrieve_s > 0
    draft = tiny_lm.extend(Prompt(QUESTIONS[0]), Draft(), 5)
    more = tiny_lm.extend(Prompt(QUESTIONS[0]), draft, 5)
    assert len(draft.tokens) <= 5 and more.tokens[:len(draft.tokens)] == draft.tokens and len(more.tokens) <= 10


def test_packing_cuts_the_last_passage_and_refuses_a_question_that_cannot_fit(tiny_lm: TransformersGenerator) -> None:
    passages = [Passage(str(i), "cells divide and grow " * 60, 1.0 - i / 10) for i in range(5)]
    prompt, packed = pack("why?", passages, tiny_lm, max_new_tokens=100)
    assert tiny_lm.prompt_tokens(prompt) <= tiny_lm.context_tokens - 100
    assert 1 <= len(packed) < 5 and [p.id for p in packed] == [str(i) for i in range(len(packed))]
    assert len(prompt.passages[-1]) < len(passages[0].text)  # cut to fit
    with pytest.raises(InvalidArgumentError, match="question"):
        pack("why " * 600, passages, tiny_lm, max_new_tokens=100)


class ScriptedGenerator(Generator):
    """Writes a fixed answer a few words per step (a stand-in for a model that cites)."""

    name, context_tokens = "scripted", 4096

    def __init__(self, script: str) -> None:
        self.words = script.split(" ")

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def truncate(self, text: str, max_tokens: int) -> str:
        return " ".join(text.split()[:max_tokens])

    def prompt_tokens(self, prompt: Prompt) -> int:
        return self.count_tokens(prompt.plain_text())

    def extend(self, prompt: Prompt, draft: Draft, max_new_tokens: int) -> Draft:
        done = len(draft.tokens)
        tokens = draft.tokens + tuple(range(done, min(done + max_new_tokens, len(self.words))))
        return Draft(tokens, " ".join(self.words[:len(tokens)]), len(tokens) == len(self.words))


def test_citations_map_markers_to_passage_ids(scifact: Any) -> None:
    rag = RAG(scifact, ScriptedGenerator("It does [2]. Trials agree [1, 3] and [9] is out of range."), k=3,
              mode="lexical")
    answer = rag.answer(QUESTIONS[0])
    ids = [p.id for p in answer.passages]
    assert answer.cited_by == "markers" and answer.citations == [ids[1], ids[0], ids[2]]
    # no markers: credited to the passage a sentence copies from
    copied = " ".join(answer.passages[1].text.split()[:12])
    plain = RAG(scifact, ScriptedGenerator(f"In short: {copied}. Nothing else here."), k=3, mode="lexical")
    unmarked = plain.answer(QUESTIONS[0])
    assert unmarked.cited_by == "overlap" and unmarked.citations == [ids[1]]
    assert attributed("Completely unrelated words about nothing.", answer.passages) == []


def test_overlap_credits_the_passage_a_sentence_copies_a_phrase_from() -> None:
    """Seen with SmolLM2-135M on SciFact: the sentence copies a phrase of passage 5, but a long
    passage on vitamin D in women holds more of its single words; word pairs pick the right one."""
    docs = {d.id: d.text for d in iter_corpus(DATA / "scifact" / "corpus.jsonl")}
    passages = [Passage(i, docs[i], 0.0) for i in ["4462079", "9555784", "23267371", "36960449", "11246427"]]
    answer = ("The passage discusses the potential link between vitamin D supplementation and reduced fracture risk "
              "in women with low bone density but no vertebral fractures.")
    assert attributed(answer, passages) == ["11246427"]


def test_iterative_citations_resolve_against_their_own_step(scifact: Any) -> None:
    rag = RAG(scifact, ScriptedGenerator("first [1] then more words here about cells [1]"), k=2, mode="lexical",
              max_new_tokens=16)
    answer = rag.answer_iterative(QUESTIONS[1], stride=2, query_words=2, speculative=False)
    assert answer.stats is not None and answer.stats.steps == 5
    first_step, last_step = answer.stats.steps_log[0], answer.stats.steps_log[-1]
    assert answer.citations[0] == first_step.passages[0].id
    assert set(answer.citations) == {first_step.passages[0].id, last_step.passages[0].id}


def test_cached_continuation_matches_a_fresh_generator_and_survives_rollback(tiny_lm: TransformersGenerator) -> None:
    """extend() reuses the attention cache of its last call; continuing, rolling back to a shorter
    draft and switching prompts must each give what a generator without any cache computes."""
    prompt = Prompt("Does vitamin D reduce fractures?", ("Vitamin D and calcium in elderly women.",))
    other = Prompt("Does vitamin D reduce fractures?", ("Bone density after menopause.",))
    first = tiny_lm.extend(prompt, Draft(), 6)
    assert tiny_lm._cache is not None and tiny_lm._cache[0][-len(first.tokens):] == list(first.tokens)
    cached_steps = [first, tiny_lm.extend(prompt, first, 6)]
    rolled_back = tiny_lm.extend(prompt, Draft(first.tokens[:3], ""), 6)  # a draft shorter than the cache
    switched = tiny_lm.extend(other, first, 6)                          # another prompt: its shared prefix only
    fresh = tiny_llama()
    assert fresh.extend(prompt, first, 6).tokens == cached_steps[1].tokens
    fresh = tiny_llama()
    assert fresh.extend(prompt, Draft(first.tokens[:3], ""), 6).tokens == rolled_back.tokens
    fresh = tiny_llama()
    assert fresh.extend(other, first, 6).tokens == switched.tokens
    assert len(cached_steps[1].tokens) == 12 and rolled_back.tokens[:3] == first.tokens[:3]


@pytest.mark.parametrize("overlap", [False, True])
def test_speculative_retrieval_gives_the_plain_loops_output(scifact: Any, tiny_lm: TransformersGenerator,
                                                            overlap: bool) -> None:
    rag = RAG(scifact, tiny_lm, k=2, max_new_tokens=40, mode="lexical")
    rolled_back = speculated = 0
    for question in QUESTIONS:
        plain = rag.answer_iterative(question, stride=4, query_words=3, speculative=False)
        spec = rag.answer_iterative(question, stride=4, query_words=3, speculative=True, window=3, overlap=overlap,
                                    policy="always")
        assert plain.stats is not None and spec.stats is not None
        assert spec.text == plain.text and spec.text
        assert [[p.id for p in s.passages] for s in spec.stats.steps_log] == \
            [[p.id for p in s.passages] for s in plain.stats.steps_log]
        assert [(p.id, p.score) for p in spec.passages] == [(p.id, p.score) for p in plain.passages]
        assert spec.citations == plain.citations
        assert spec.stats.store_calls < plain.stats.store_calls == plain.stats.steps
        rolled_back += spec.stats.rolled_back
        speculated += spec.stats.speculated
    # both branches ran: some speculations held, some were wrong and rolled back
    assert rolled_back >= 1 and speculated > rolled_back


@pytest.fixture(scope="module")
def scifact_encoded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The same slice in a collection that knows its encoder, so text queries search densely."""
    ids, vectors = shipped_embeddings("scifact")
    texts = {d.id: d.text for d in iter_corpus(DATA / "scifact" / "corpus.jsonl")}
    client = nestvec.connect(tmp_path_factory.mktemp("rag-dense"))
    col = client.create_collection("d", encoder="all-MiniLM-L6-v2", codec="int8")
    col.upsert(ids[:N], vectors=np.ascontiguousarray(vectors[:N]), texts=[texts[i] for i in ids[:N]])
    yield col
    client.close()


def test_the_passage_cache_answers_in_the_stores_order() -> None:
    cache = PassageCache(2)
    a, b, c = Passage("a", "A", 0.0), Passage("b", "B", 0.0), Passage("c", "C", 0.0)
    cache.add([b, a], np.array([[1.0, 0.0], [2.0, 0.0]]))  # stored unnormalised: scored as unit vectors
    cache.add([a, c], np.array([[0.0, 1.0], [0.6, 0.8]]))  # a again keeps its first vector
    assert len(cache) == 3
    assert [p.id for p in cache.top_k(np.array([1.0, 0.0]), 3)] == ["a", "b", "c"]  # a tie broken by id
    top = cache.top_k(np.array([0.0, 1.0]), 1)
    assert [p.id for p in top] == ["c"] and top[0].score == pytest.approx(0.8) and top[0].text == "C"
    cache.clear()
    assert cache.top_k(np.array([1.0, 0.0]), 1) == []


def test_speculation_from_the_local_cache_of_passages_and_vectors(scifact_encoded: Any,
                                                                  tiny_lm: TransformersGenerator) -> None:
    """RaLMSpec's cache: the store's top-(k + prefetch) with their vectors, searched with each
    step's query vector. In dense mode it guesses better than the previous step's passages, the
    loop picks it, and the text is the plain loop's."""
    rag = RAG(scifact_encoded, tiny_lm, k=3, max_new_tokens=40, mode="dense", prefetch=12)
    assert rag.query_encoder() is scifact_encoded.encoder
    speculated: dict[str, int] = {}
    for question in QUESTIONS:
        plain = rag.answer_iterative(question, stride=4, query_words=3, speculative=False)
        spec = rag.answer_iterative(question, stride=4, query_words=3, speculative=True, window=3, policy="always")
        assert plain.stats is not None and spec.stats is not None
        assert spec.text == plain.text and spec.citations == plain.citations
        assert [[p.id for p in s.passages] for s in spec.stats.steps_log] == \
            [[p.id for p in s.passages] for s in plain.stats.steps_log]
        # verified guesses carry the store's scores, not the cache's own inner products
        assert [(p.id, p.score) for p in spec.passages] == [(p.id, p.score) for p in plain.passages]
        assert max(len(s.passages) for s in plain.stats.steps_log) <= 3  # prefetched passages are not packed
        for source, count in spec.stats.speculated_from.items():
            speculated[source] = speculated.get(source, 0) + count
    costs = rag.speculation_costs
    assert costs.source_rate("cache") > costs.source_rate("previous")
    assert speculated.get("cache", 0) > speculated.get("previous", 0)
    assert costs.best_source(["previous", "cache"]) == "cache"
    with pytest.raises(InvalidArgumentError, match="prefetch"):
        RAG(scifact_encoded, tiny_lm, prefetch=-1)


def test_a_collection_without_an_encoder_speculates_from_the_previous_step(scifact: Any,
                                                                          tiny_lm: TransformersGenerator) -> None:
    rag = RAG(scifact, tiny_lm, k=2, max_new_tokens=16, mode="lexical")
    assert rag.query_encoder() is None
    answer = rag.answer_iterative(QUESTIONS[0], stride=4, query_words=3, policy="always")
    assert answer.stats is not None and set(answer.stats.speculated_from) <= {"previous"}


def test_speculation_costs_weigh_store_latency_against_a_wasted_step() -> None:
    costs = SpeculationCosts()
    assert not costs.worth_speculating()  # nothing measured yet: wait for the store
    costs.observe_store(0.200)
    costs.observe_step(1.5)    # the first step: a whole prefill
    costs.observe_step(0.100)  # a step that continued from the cache: what a wrong speculation wastes
    assert costs.step_s == 0.100 and costs.hit_rate == 0.5
    assert costs.worth_speculating()  # 0.5 * 0.2 > 0.5 * 0.1
    costs.observe_waste(0.300)        # a wrong speculation threw away three steps
    assert not costs.worth_speculating()
    costs.observe_waste(0.100)
    costs.observe_waste(0.100)
    assert costs.miss_s is not None and costs.miss_s < 0.2 and costs.worth_speculating()
    for _ in range(6):
        costs.observe_outcome(False)
    assert costs.hit_rate == 1 / 8 and not costs.worth_speculating()
    for _ in range(30):
        costs.observe_outcome(True)
    assert costs.worth_speculating()
    for _ in range(10):  # the store became fast: smoothed, it soon is not worth it
        costs.observe_store(0.001)
    assert not costs.worth_speculating()


class _Slow(TransformersGenerator):
    """The tiny LM made to cost `delay_s` a step, like a real model on a CPU."""

    def __init__(self, inner: TransformersGenerator, delay_s: float) -> None:
        self.__dict__.update(inner.__dict__)
        self.delay_s = delay_s

    def extend(self, prompt: Prompt, draft: Draft, max_new_tokens: int) -> Draft:
        time.sleep(self.delay_s)
        return super().extend(prompt, draft, max_new_tokens)


@pytest.mark.parametrize("slow", ["store", "generator"])
def test_auto_policy_speculates_only_where_the_store_is_the_slow_side(scifact: Any, tiny_lm: TransformersGenerator,
                                                                      slow: str) -> None:
    rag = RAG(scifact, tiny_lm if slow == "store" else _Slow(tiny_lm, 0.05), k=2, max_new_tokens=40,
              mode="lexical")

    def retrieve(queries: Sequence[str]) -> list[list[Passage]]:
        if slow == "store":
            time.sleep(0.05)
        return rag.retrieve_batch(queries)

    def run(loop: Any, **kwargs: Any) -> tuple[Draft, LoopStats]:
        return loop(QUESTIONS[0], retrieve, lambda p: rag._pack(QUESTIONS[0], p), rag.generator, stride=2,
                    max_new_tokens=40, query_words=1, **kwargs)

    plain, plain_stats = run(plain_loop)
    spec, spec_stats = run(speculative_loop, policy="auto")
    assert spec.text == plain.text
    if slow == "store":  # a 50 ms store against millisecond steps: speculate, ask less often
        assert spec_stats.speculated > 0 and spec_stats.store_calls < plain_stats.store_calls
    else:                # a 50 ms step against a millisecond store: a wrong guess costs more than waiting
        assert spec_stats.speculated == 0 and spec_stats.store_calls == plain_stats.store_calls


def test_filters_and_search_options_reach_every_retrieval(scifact: Any, tiny_lm: TransformersGenerator) -> None:
    rag = RAG(scifact, tiny_lm, k=3, max_new_tokens=12, mode="lexical", filter={"half": 1})
    answer = rag.answer_iterative(QUESTIONS[2], stride=4, query_words=3, speculative=True, window=2)
    assert answer.passages and all(p.metadata["half"] == 1 for p in answer.passages)
    with pytest.raises(InvalidArgumentError, match="mode"):
        RAG(scifact, tiny_lm, mode="fuzzy").answer(QUESTIONS[0])
    with pytest.raises(InvalidArgumentError, match="prompt_template"):
        RAG(scifact, tiny_lm, prompt_template="no placeholders")
    with pytest.raises(InvalidArgumentError, match="question"):
        RAG(scifact, tiny_lm, mode="lexical").answer("  ")
    with pytest.raises(InvalidArgumentError, match="stride"):
        RAG(scifact, tiny_lm, mode="lexical").answer_iterative(QUESTIONS[0], stride=0)


class _FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint: chat answers cite [1]; completions continue with words
    picked by the prompt's length (deterministic, like greedy decoding)."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        if self.path == "/v1/chat/completions":
            reply: dict[str, Any] = {"choices": [{"message": {"content": "Yes [1]."}, "finish_reason": "stop"}]}
        elif self.path == "/v1/completions":
            words = ["cells", "grow", "vitamin", "bone", "insulin", "neurons", "fracture"]
            n = body["max_tokens"]
            text = " " + " ".join(words[(len(body["prompt"]) + i) % len(words)] for i in range(n))
            reply = {"choices": [{"text": text, "finish_reason": "length"}]}
        else:
            self.send_error(404)
            return
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_openai_compatible_endpoint(scifact: Any) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        generator = OpenAIGenerator(f"http://127.0.0.1:{server.server_port}/v1", "test-model", api_key="sk-test")
        rag = RAG(scifact, generator, k=3, mode="lexical", max_new_tokens=24)
        answer = rag.answer(QUESTIONS[0])
        assert answer.text == "Yes [1]." and answer.citations == [answer.passages[0].id]
        chat = _FakeOpenAI.seen[-1]
        assert chat["model"] == "test-model" and chat["temperature"] == 0 and chat["auth"] == "Bearer sk-test"
        assert answer.passages[0].text[:40] in chat["messages"][1]["content"]
        plain = rag.answer_iterative(QUESTIONS[1], stride=4, query_words=2, speculative=False)
        spec = rag.answer_iterative(QUESTIONS[1], stride=4, query_words=2, speculative=True, window=3)
        assert spec.text == plain.text and len(plain.text.split()) == 24
        with pytest.raises(nestvec.FailedPreconditionError, match="404"):
            OpenAIGenerator(f"http://127.0.0.1:{server.server_port}/nope", "m").generate(Prompt("q"), 4)
    finally:
        server.shutdown()
    with pytest.raises(InvalidArgumentError, match="base_url"):
        OpenAIGenerator("localhost:8000", "m")


def test_cli_answers_with_a_local_model_folder(tmp_path: Path, tiny_lm: TransformersGenerator,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from nestvec.cli import main

    tiny_lm.model.save_pretrained(tmp_path / "model")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "model")
    ids, vectors = shipped_embeddings("scifact")
    texts = {d.id: d.text for d in iter_corpus(DATA / "scifact" / "corpus.jsonl")}
    with nestvec.connect(tmp_path / "data") as client:
        col = client.create_collection("s", encoder=None, dim=384, codec="int8")
        col.upsert(ids[:100], vectors=vectors[:100], texts=[texts[i] for i in ids[:100]])
    args = ["--data", str(tmp_path / "data"), "rag", QUESTIONS[0], "--collection", "s", "--generator",
            str(tmp_path / "model"), "--mode", "lexical", "-k", "2", "--max-new-tokens", "8", "--context-tokens", "512"]
    assert main(args) == 0
    out = capsys.readouterr().out
    top = nestvec.connect(tmp_path / "data").get_collection("s").search(QUESTIONS[0], k=1, mode="lexical")
    assert "Sources" in out and f"[1] {top[0].id}" in out
    assert main([*args, "--iterative", "--stride", "4", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["iterative"]["steps"] == 2 and payload["passages"][0]["id"] == top[0].id
    assert main(["--data", str(tmp_path / "data"), "rag", "q", "--collection", "s", "--generator",
                 str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
