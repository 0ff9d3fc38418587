"""All searches run on one thread, in arrival order; a crowd of single queries with the same
settings is answered by one search_batch.

A search is mostly short numpy and LMDB calls that hold the GIL; on 2 cores, two of them at once
only hand the GIL back and forth (measured with 8 clients on a 100k SPANN collection: p99 30 ms
with two searches at a time, 23 ms with one). So one thread runs them, first come first served,
and each single query is answered as soon as its own search is done: a turn that held five
queries and answered them together made the first wait for all five. Only when more than
`batch_from` queries with the same key are waiting does a stacked search_batch pay (the index
reads and scores each posting list once for all of them), and then they are answered together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nestvec.errors import invalid
from nestvec.types import Hit

BATCH_FROM = 16  # SpannIndex answers up to SMALL_BATCH (16) queries one by one anyway


@dataclass(eq=False)
class _Job:
    key: Hashable
    work: Callable[[Any], Any]  # run(stacked vectors) for a query, or a plain call for run_alone
    vector: np.ndarray | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()

    def outcome(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


def check_search_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise invalid("search_threads", f"must be a positive integer, got {threads!r}")
    return threads


class SearchCoalescer:
    def __init__(self, batch_from: int = BATCH_FROM, on_start: Callable[[], None] | None = None,
                 threads: int = 1) -> None:
        self.batch_from = batch_from
        self.threads = check_search_threads(threads)
        self._on_start = on_start  # e.g. one OpenMP thread for faiss calls made on the search thread
        self._ready = threading.Condition()
        self._pending: list[_Job] = []
        self._workers: list[threading.Thread] = []

    def search(self, key: Hashable, vector: np.ndarray,
               run: Callable[[np.ndarray], list[list[Hit]]]) -> list[Hit]:
        """Hits for one query vector; `run` answers a stack of queries sharing `key` (same
        collection, k, filter and knobs), so callers must have validated everything else first."""
        hits: list[Hit] = self._submit(_Job(key, run, vector))
        return hits

    def run_alone(self, call: Callable[[], Any]) -> Any:
        """A search that is not coalesced (a client's own batch) still takes its turn on the thread."""
        return self._submit(_Job(None, lambda _: call()))

    def _submit(self, job: _Job) -> Any:
        with self._ready:
            if not self._workers:
                self._workers = [threading.Thread(target=self._loop, name=f"nestvec-search-{i}", daemon=True)
                                 for i in range(self.threads)]
                for worker in self._workers:
                    worker.start()
            self._pending.append(job)
            self._ready.notify()
        return job.outcome()

    def _loop(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            with self._ready:
                while not self._pending:
                    self._ready.wait()
                jobs = self._take()
            self._run_turn(jobs)

    def _take(self) -> list[_Job]:
        """One thread takes every waiting job; with more threads, each takes the oldest job, or
        the oldest job's whole crowd when it is large enough to batch, so the others stay free."""
        if self.threads == 1:
            jobs, self._pending = self._pending, []
            return jobs
        first = self._pending[0]
        crowd = [j for j in self._pending if first.vector is not None and j.vector is not None and j.key == first.key]
        if len(crowd) > self.batch_from:
            taken = {id(j) for j in crowd}
            self._pending = [j for j in self._pending if id(j) not in taken]
            return crowd
        return [self._pending.pop(0)]

    def _run_turn(self, jobs: list[_Job]) -> None:
        """Arrival order; a key with more than batch_from queries waiting runs as one batch."""
        crowds: dict[Hashable, list[_Job]] = {}
        for job in jobs:
            if job.vector is not None:
                crowds.setdefault(job.key, []).append(job)
        started: set[Hashable] = set()
        for job in jobs:
            crowd = crowds.get(job.key, []) if job.vector is not None else []
            if len(crowd) > self.batch_from:
                if job.key not in started:
                    started.add(job.key)
                    self._run_together(crowd)
                continue
            try:
                result = job.work(job.vector[None] if job.vector is not None else None)
                job.finish(result[0] if job.vector is not None else result)
            except BaseException as err:  # the caller's thread re-raises it
                job.finish(error=err)

    @staticmethod
    def _run_together(crowd: list[_Job]) -> None:
        try:
            results = crowd[0].work(np.stack([j.vector for j in crowd if j.vector is not None]))
        except BaseException as err:  # same key, same cause: every request in it gets the error
            for j in crowd:
                j.finish(error=err)
            return
        for j, hits in zip(crowd, results, strict=True):
            j.finish(hits)
