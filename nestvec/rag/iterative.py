"""Iterative retrieval (retrieve again every `stride` generated tokens, the question plus the
recent answer as the query) and RaLMSpec's speculative version of it (Zhang et al., 2024).

Speculation: consecutive queries overlap almost entirely, so the passages a step will retrieve are
usually among those earlier steps retrieved. Two sources guess them: the previous step's passages,
and RaLMSpec's local cache (every passage the store returned this answer, with its vector, searched
with the step's query vector: see nestvec.rag.cache). Each guess is scored against the store at
every checked step, and the loop speculates from the source that has been right most often.
The speculative loop generates with the guess at once and
checks it later, several steps in one SearchBatch, in a worker thread while generation goes on.
At the first step whose speculation the store contradicts, the answer is cut back to where that
step began and continued with the store's passages. Every step therefore ends up generated from
exactly the passages the plain loop would have retrieved for exactly the same draft, and the
generator's `extend` is deterministic under greedy decoding: the outputs are identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from nestvec.errors import invalid
from nestvec.rag.context import Passage
from nestvec.rag.generators import Draft, Generator, Prompt

RetrieveBatch = Callable[[Sequence[str]], list[list[Passage]]]
Pack = Callable[[Sequence[Passage]], tuple[Prompt, list[Passage]]]
Speculator = Callable[[str], list[Passage]]  # a step's query -> the passages guessed for it
PREVIOUS = "previous"  # the speculation source every loop has: the last step's passages


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
    speculated_from: dict[str, int] = field(default_factory=dict)  # of those, by source
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


def _scored_by(packed: Sequence[Passage], truth: Sequence[Passage]) -> list[Passage]:
    """The packed passages with the store's scores: a guess from the local cache carries the
    cache's own inner products, which differ from the store's (codes, hybrid fusion)."""
    scores = {p.id: p.score for p in truth}
    return [replace(p, score=scores.get(p.id, p.score)) for p in packed]


def plain_loop(question: str, retrieve: RetrieveBatch, pack: Pack, generator: Generator, *, stride: int,
               max_new_tokens: int, query_words: int) -> tuple[Draft, LoopStats]:
    """Retrieve, generate `stride` tokens, repeat: the store answers every step."""
    stats, draft = LoopStats(), Draft()
    generator.reset()
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
    guesses: dict[str, list[Passage]] = field(default_factory=dict)  # every source's guess, to score


SPECULATION_POLICIES = ("auto", "always")


@dataclass
class SpeculationCosts:
    """What RaLMSpec's scheduler weighs, measured as answers go: the store's latency, what a wrong
    speculation throws away, and how often the previous step's passages were the right ones.

    A right speculation saves a wait for the store; a wrong one throws away every step generated
    from it before its check came back. Speculate when hit_rate * store_s exceeds
    (1 - hit_rate) * miss_s. Until a miss is seen, miss_s is the cheapest step seen (a speculated
    step continues from the attention cache). A fast local store under a slow CPU generator
    therefore waits for the store; a distant or loaded store speculates. RAG keeps one across its
    answers, so later answers start from what earlier ones measured."""

    store_s: float | None = None   # smoothed latency of one store call
    step_s: float | None = None    # the cheapest step generated so far
    miss_s: float | None = None    # smoothed generation time thrown away by one wrong speculation
    sources: dict[str, list[int]] = field(default_factory=dict)  # source -> [right, wrong] guesses

    def observe_store(self, seconds: float) -> None:
        self.store_s = _smooth(self.store_s, seconds)

    def observe_step(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s is None else min(self.step_s, seconds)

    def observe_waste(self, seconds: float) -> None:
        self.miss_s = _smooth(self.miss_s, seconds)

    def observe_outcome(self, hit: bool, source: str = PREVIOUS) -> None:
        self.sources.setdefault(source, [0, 0])[0 if hit else 1] += 1

    def source_rate(self, source: str) -> float:
        right, wrong = self.sources.get(source, (0, 0))
        return (right + 1) / (right + wrong + 2)  # a uniform prior: 1/2 before any evidence

    def best_source(self, available: Sequence[str] = (PREVIOUS,)) -> str:
        """The source right most often so far (the previous step's passages on a tie)."""
        return max(available, key=lambda s: (self.source_rate(s), s == PREVIOUS))

    def worth_asking(self, source: str, margin: float = 0.15, after: int = 8) -> bool:
        """Keep computing a source's guesses until it has clearly lost to the best one."""
        right, wrong = self.sources.get(source, (0, 0))
        return right + wrong < after or self.source_rate(source) + margin >= self.hit_rate

    @property
    def hit_rate(self) -> float:
        return max((self.source_rate(s) for s in self.sources), default=self.source_rate(PREVIOUS))

    def worth_speculating(self) -> bool:
        miss = self.miss_s if self.miss_s is not None else self.step_s
        if self.store_s is None or miss is None:
            return False
        return self.hit_rate * self.store_s > (1 - self.hit_rate) * miss


def _smooth(previous: float | None, seconds: float) -> float:
    return seconds if previous is None else 0.7 * previous + 0.3 * seconds


def speculative_loop(question: str, retrieve: RetrieveBatch, pack: Pack, generator: Generator, *,
                     stride: int, max_new_tokens: int, query_words: int, window: int = 4,
                     overlap: bool = True, policy: str = "auto",
                     costs: SpeculationCosts | None = None,
                     speculators: dict[str, Speculator] | None = None) -> tuple[Draft, LoopStats]:
    """The plain loop's output, with the store asked once per up to `window` steps instead of
    every step (in a worker thread while generation continues, when `overlap`). `policy` "auto"
    speculates only where SpeculationCosts expects it to pay; "always" speculates at every step.
    `speculators`: guess sources beside the previous step's passages (e.g. the local cache)."""
    if policy not in SPECULATION_POLICIES:
        raise invalid("policy", f"must be one of {', '.join(SPECULATION_POLICIES)}, got {policy!r}")
    schedule = _schedule(max_new_tokens, stride)
    stats, draft = LoopStats(), Draft()
    costs = costs if costs is not None else SpeculationCosts()
    generator.reset()  # both loops start from the same generator state
    wall = time.perf_counter()
    steps: list[Step] = []            # steps_log[i] belongs to schedule[i]
    step_seconds: list[float] = []    # the generation time of each of `steps`
    pending: list[_Pending] = []      # speculated steps, oldest first
    in_flight: tuple[Future[tuple[list[list[Passage]], float]], list[_Pending]] | None = None
    known: list[Passage] | None = None  # passages the store gave for the step about to run, if known
    last: list[Passage] = []          # the newest passages used: the next step's speculation
    pool = ThreadPoolExecutor(1, thread_name_prefix="nestvec-verify") if overlap else None
    # RaLMSpec adapts how many speculations one check covers: a wrong one throws away every step
    # generated after it, so after a miss check each step, and double the span after each clean check.
    current = 1

    def timed(queries: list[str]) -> tuple[list[list[Passage]], float]:
        start = time.perf_counter()
        found = retrieve(queries)
        return found, time.perf_counter() - start

    def ask(queries: list[str]) -> list[list[Passage]]:
        """The store, now: generation waits for it."""
        stats.store_calls += 1
        stats.store_queries += len(queries)
        start = time.perf_counter()
        found, seconds = timed(queries)
        stats.retrieve_s += time.perf_counter() - start
        costs.observe_store(seconds)
        return found

    def submit(batch: list[_Pending]) -> tuple[Future[tuple[list[list[Passage]], float]], list[_Pending]]:
        queries = [p.query for p in batch]
        if pool is None:
            done: Future[tuple[list[list[Passage]], float]] = Future()
            done.set_result((ask(queries), 0.0))  # ask() measured the call already
            return done, batch
        stats.store_calls += 1
        stats.store_queries += len(batch)
        return pool.submit(timed, queries), batch

    extra = dict(speculators or {})

    def guesses(query: str) -> dict[str, list[Passage]]:
        """Each source's guess for a step; a source that has clearly lost is no longer asked."""
        out = {PREVIOUS: last} if last else {}
        for name, guess in extra.items():
            if costs.worth_asking(name) and (found := guess(query)):
                out[name] = found
        return out

    def score(guessed: dict[str, list[Passage]], truth: list[Passage]) -> None:
        for name, passages in guessed.items():
            costs.observe_outcome(_same(passages, truth), name)

    def check(batch: list[_Pending], truths: list[list[Passage]]) -> _Pending | None:
        """Compare speculations with the store; at the first wrong one, rewind to it."""
        nonlocal draft, known, last, pending, current
        for spec, truth in zip(batch, truths, strict=True):
            hit = _same(spec.passages, truth)
            score(spec.guesses, truth)
            if hit:  # the step stands; its passages carry the store's scores, as in the plain loop
                steps[spec.index].passages = _scored_by(steps[spec.index].passages, truth)
            else:
                stats.rolled_back += 1
                draft, known, last = spec.before, truth, truth
                costs.observe_waste(sum(step_seconds[spec.index:]))
                del steps[spec.index:], step_seconds[spec.index:]
                pending, current = [], 1
                return spec
        current = min(2 * current, window)
        return None

    def settle(flight: tuple[Future[tuple[list[list[Passage]], float]], list[_Pending]]) -> _Pending | None:
        future, batch = flight
        start = time.perf_counter()
        truths, seconds = future.result()
        stats.retrieve_s += time.perf_counter() - start
        if pool is not None:
            costs.observe_store(seconds)
        return check(batch, truths)

    try:
        index = 0
        while index < len(schedule) and not draft.finished:
            query = recent_query(question, draft, query_words)
            guessed = guesses(query) if known is None else {}
            if known is not None:
                passages, known = known, None
            elif guessed and (policy == "always" or costs.worth_speculating()):
                source = costs.best_source(list(guessed))
                passages = guessed[source]
                pending.append(_Pending(index, draft, query, passages, guessed))
                stats.speculated += 1
                stats.speculated_from[source] = stats.speculated_from.get(source, 0) + 1
            else:
                # wait for the store: this step's query goes with every unchecked speculation
                wrong = settle(in_flight) if in_flight is not None else None
                in_flight = None
                if wrong is None:
                    batch, pending = pending, []
                    truths = ask([p.query for p in batch] + [query])
                    wrong = check(batch, truths[:-1])
                if wrong is not None:
                    index = wrong.index
                    continue
                passages = truths[-1]
                score(guessed, passages)  # would speculating have been right? learnt without risking a step
            last = passages
            prompt, packed = pack(passages)
            start = time.perf_counter()
            draft = _generate(generator, prompt, draft, schedule[index], stats)
            step_seconds.append(time.perf_counter() - start)
            costs.observe_step(step_seconds[-1])
            steps.append(Step(packed, len(draft.text)))
            index += 1
            if in_flight is not None and (in_flight[0].done() or len(pending) >= current):
                flight, in_flight = in_flight, None
                wrong = settle(flight)
                if wrong is not None:
                    index = wrong.index
                    continue
            if in_flight is None and pending and len(pending) >= current:
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
