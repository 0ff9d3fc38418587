"""Iterative retrieval (retrieve again every `stride` generated tokens, the question plus the
recent answer as the query) and RaLMSpec's speculative version of it (Zhang et al., 2024).

Speculation: consecutive queries overlap almost entirely, so the passages a step will retrieve are
usually the ones the step before retrieved. The speculative loop generates with those at once and
checks them later, several steps in one SearchBatch, in a worker thread while generation goes on.
At the first step whose speculation the store contradicts, the answer is cut back to where that
step began and continued with the store's passages. Every step therefore ends up generated from
exactly the passages the plain loop would have retrieved for exactly the same draft, and the
generator's `extend` is deterministic under greedy decoding: the outputs are identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from nestvec.rag.context import Passage
from nestvec.rag.generators import Draft, Generator, Prompt

RetrieveBatch = Callable[[Sequence[str]], list[list[Passage]]]
Pack = Callable[[Sequence[Passage]], tuple[Prompt, list[Passage]]]


@dataclass
class Step:
    """One stride of the answer: the passages it was generated from and where its text ends."""

    passages: list[Passage]
    end: int  # len(draft.text) after the step


@dataclass
class LoopStats:
    steps: int = 0                # strides generated into the final answer
    generated_steps: int = 0      # strides generated in all, rolled-back ones included
    store_queries: int = 0        # queries the store answered
    store_calls: int = 0          # search calls made (a SearchBatch of several queries is one)
    speculated: int = 0           # steps generated from speculated passages
    rolled_back: int = 0          # speculated steps found wrong (the first wrong one of each check)
    retrieve_s: float = 0.0       # time generation waited for the store
    generate_s: float = 0.0
    wall_s: float = 0.0
    steps_log: list[Step] = field(default_factory=list)


def recent_query(question: str, draft: Draft, words: int) -> str:
    """The query of a step: the question and the last `words` words of the answer so far."""
    tail = draft.text.split()[-words:] if words > 0 else []
    return f"{question} {' '.join(tail)}" if tail else question


def _schedule(max_new_tokens: int, stride: int) -> list[int]:
    """Tokens each step generates: a fixed plan, so both loops cut the answer at the same places."""
    return [min(stride, max_new_tokens - start) for start in range(0, max_new_tokens, stride)]


def _generate(generator: Generator, prompt: Prompt, draft: Draft, tokens: int, stats: LoopStats) -> Draft:
    start = time.perf_counter()
    draft = generator.extend(prompt, draft, tokens)
    stats.generate_s += time.perf_counter() - start
    stats.generated_steps += 1
    return draft


def _same(a: Sequence[Passage], b: Sequence[Passage]) -> bool:
    return [(p.id, p.text) for p in a] == [(p.id, p.text) for p in b]


def plain_loop(question: str, retrieve: RetrieveBatch, pack: Pack, generator: Generator, *, stride: int,
               max_new_tokens: int, query_words: int) -> tuple[Draft, LoopStats]:
    """Retrieve, generate `stride` tokens, repeat: the store answers every step."""
    stats, draft = LoopStats(), Draft()
    wall = time.perf_counter()
    for tokens in _schedule(max_new_tokens, stride):
        if draft.finished:
            break
        start = time.perf_counter()
        passages = retrieve([recent_query(question, draft, query_words)])[0]
        stats.retrieve_s += time.perf_counter() - start
        stats.store_queries += 1
        stats.store_calls += 1
        prompt, packed = pack(passages)
        draft = _generate(generator, prompt, draft, tokens, stats)
        stats.steps_log.append(Step(packed, len(draft.text)))
    stats.steps, stats.wall_s = len(stats.steps_log), time.perf_counter() - wall
    return draft, stats


@dataclass
class _Pending:
    """A step generated from speculated passages, not yet checked against the store."""

    index: int          # the step's place in the schedule
    before: Draft       # the draft the step started from
    query: str
    passages: list[Passage]


def speculative_loop(question: str, retrieve: RetrieveBatch, pack: Pack, generator: Generator, *,
                     stride: int, max_new_tokens: int, query_words: int, window: int = 4,
                     overlap: bool = True) -> tuple[Draft, LoopStats]:
    """The plain loop's output, with the store asked once per `window` steps instead of every
    step (in a worker thread while generation continues, when `overlap`)."""
    schedule = _schedule(max_new_tokens, stride)
    stats, draft = LoopStats(), Draft()
    wall = time.perf_counter()
    steps: list[Step] = []            # steps_log[i] belongs to schedule[i]
    pending: list[_Pending] = []      # speculated steps, oldest first
    in_flight: tuple[Future[list[list[Passage]]], list[_Pending]] | None = None
    known: list[Passage] | None = None  # passages the store gave for the step about to run, if known
    last: list[Passage] = []          # the newest passages used: the next step's speculation
    pool = ThreadPoolExecutor(1, thread_name_prefix="nestvec-verify") if overlap else None

    def submit(batch: list[_Pending]) -> tuple[Future[list[list[Passage]]], list[_Pending]]:
        stats.store_calls += 1
        stats.store_queries += len(batch)
        queries = [p.query for p in batch]
        if pool is None:
            done: Future[list[list[Passage]]] = Future()
            done.set_result(retrieve(queries))
            return done, batch
        return pool.submit(retrieve, queries), batch

    def settle(flight: tuple[Future[list[list[Passage]]], list[_Pending]]) -> _Pending | None:
        """Wait for a check; on the first wrong speculation, rewind to it. Returns that step."""
        nonlocal draft, known, last, pending
        future, batch = flight
        start = time.perf_counter()
        truths = future.result()
        stats.retrieve_s += time.perf_counter() - start
        for spec, truth in zip(batch, truths, strict=True):
            if not _same(spec.passages, truth):
                stats.rolled_back += 1
                draft, known, last = spec.before, truth, truth
                del steps[spec.index:]
                pending = []
                return spec
        return None

    try:
        index = 0
        while index < len(schedule) and not draft.finished:
            query = recent_query(question, draft, query_words)
            if known is not None:
                passages, known = known, None
            elif not last:  # the first step: nothing to speculate from
                start = time.perf_counter()
                passages = retrieve([query])[0]
                stats.retrieve_s += time.perf_counter() - start
                stats.store_calls += 1
                stats.store_queries += 1
            else:
                passages = last
                pending.append(_Pending(index, draft, query, passages))
                stats.speculated += 1
            last = passages
            prompt, packed = pack(passages)
            draft = _generate(generator, prompt, draft, schedule[index], stats)
            steps.append(Step(packed, len(draft.text)))
            index += 1
            if in_flight is not None and (in_flight[0].done() or len(pending) >= 2 * window):
                flight, in_flight = in_flight, None
                wrong = settle(flight)
                if wrong is not None:
                    index = wrong.index
                    continue
            if in_flight is None and len(pending) >= window:
                in_flight = submit(pending)
                pending = []
            # the answer is complete: check everything still unchecked before returning it
            if index >= len(schedule) or draft.finished:
                wrong = None
                if in_flight is not None:
                    flight, in_flight = in_flight, None
                    wrong = settle(flight)
                if wrong is None and pending:
                    batch, pending = pending, []
                    wrong = settle(submit(batch))
                if wrong is not None:
                    index = wrong.index
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    stats.steps_log = steps
    stats.steps, stats.wall_s = len(steps), time.perf_counter() - wall
    return draft, stats
