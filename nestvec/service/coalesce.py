"""Searches run one at a time (or `threads` at a time), in arrival order, on the request threads
themselves; a crowd of single queries with the same settings is answered by one search_batch.

A search is mostly short numpy and LMDB calls that hold the GIL; on 2 cores, two of them at once
only hand the GIL back and forth (measured with 8 clients on a 100k SPANN collection: p99 30 ms
with two searches at a time, 23 ms with one). So searches take turns, first come first served.

No thread is kept for them: the request thread that finds no search running leads, runs its own
search and passes the lead to the oldest waiting request, whose thread runs next. At 200 searches
a second most requests find the turn free and run at once, with no hand-off to another thread (a
wake-up that waits for a core when both are busy); only requests that queue pay one. A leader
stops after its own search, so no request waits for the searches queued behind it. Only when
more than `batch_from` queries with the same key are waiting does a stacked search_batch pay
(the index reads and scores each posting list once for all of them), and then they are
answered together.
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
    wake: threading.Event = field(default_factory=threading.Event)  # finished, or asked to lead
    finished: bool = False
    promoted: bool = False  # its thread is to lead next
    result: Any = None
    error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.finished = result, error, True
        self.wake.set()

    def outcome(self) -> Any:
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
        self._on_start = on_start  # e.g. one OpenMP thread for faiss calls, once per leading thread
        self._started = threading.local()
        self._lock = threading.Lock()
        self._pending: list[_Job] = []
        self._leaders = 0  # threads running searches now, at most `threads`

    def search(self, key: Hashable, vector: np.ndarray,
               run: Callable[[np.ndarray], list[list[Hit]]]) -> list[Hit]:
        """Hits for one query vector; `run` answers a stack of queries sharing `key` (same
        collection, k, filter and knobs), so callers must have validated everything else first."""
        hits: list[Hit] = self._submit(_Job(key, run, vector))
        return hits

    def run_alone(self, call: Callable[[], Any]) -> Any:
        """A search that is not coalesced (a client's own batch) still takes its turn."""
        return self._submit(_Job(None, lambda _: call()))

    def _submit(self, job: _Job) -> Any:
        with self._lock:
            self._pending.append(job)
            lead = self._leaders < self.threads
            self._leaders += int(lead)
        while not lead:
            job.wake.wait()
            job.wake.clear()
            lead = job.promoted  # asked to lead (its own search may be done by then, or not)
            if job.finished and not lead:
                break
        if lead:
            self._lead(job)
        return job.outcome()

    def _lead(self, mine: _Job) -> None:
        """Run turns until this thread's own job is finished, then pass the lead on."""
        if self._on_start is not None and not getattr(self._started, "done", False):
            self._started.done = True
            self._on_start()
        try:
            while not mine.finished:
                with self._lock:
                    jobs = self._take() if self._pending else []
                if not jobs:  # another leader holds this job (threads > 1): wait for it
                    while not mine.finished:
                        mine.wake.wait()
                        mine.wake.clear()
                    break
                left = self._run_turn(jobs, mine)
                if left:
                    with self._lock:
                        self._pending[:0] = left
        finally:
            with self._lock:
                waiting = next((j for j in self._pending if not j.promoted), None)
                if waiting is None:
                    self._leaders -= 1
                else:
                    waiting.promoted = True
                    waiting.wake.set()

    def _take(self) -> list[_Job]:
        """One leader at a time takes every waiting job; with more, each takes the oldest job,
        or the oldest job's whole crowd when it is large enough to batch, so the others stay free."""
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

    def _run_turn(self, jobs: list[_Job], mine: _Job) -> list[_Job]:
        """Arrival order; a key with more than batch_from queries waiting runs as one batch. Stops
        once `mine` is finished and returns the jobs it did not run."""
        crowds: dict[Hashable, list[_Job]] = {}
        for job in jobs:
            if job.vector is not None:
                crowds.setdefault(job.key, []).append(job)
        for at, job in enumerate(jobs):
            if mine.finished:
                return [j for j in jobs[at:] if not j.finished]
            if job.finished:  # ran with its crowd
                continue
            crowd = crowds.get(job.key, []) if job.vector is not None else []
            if len(crowd) > self.batch_from:
                self._run_together(crowd)
                continue
            try:
                result = job.work(job.vector[None] if job.vector is not None else None)
                job.finish(result[0] if job.vector is not None else result)
            except BaseException as err:  # the caller's thread re-raises it
                job.finish(error=err)
        return []

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
