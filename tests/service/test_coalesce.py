"""Concurrent single searches share turns on the server: each still gets exactly its own answer,
and a bad request fails alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from nestvec.errors import InvalidArgumentError
from nestvec.service.coalesce import SearchCoalescer
from nestvec.types import Hit
from realdata import DATA
from servers import RunningServer


def test_concurrent_searches_get_their_own_results(server: RunningServer) -> None:
    base = np.load(DATA / "wiki250k" / "minilm_base150k_fp16.npy", mmap_mode="r")[:3000].astype(np.float32)
    queries = np.load(DATA / "wiki250k" / "minilm_queries_fp16.npy")[:120].astype(np.float32)
    client = server.client()
    col = client.create_collection("w", encoder=None, dim=384, index="spann")
    col.upsert([f"p{i}" for i in range(3000)], vectors=base, metadata=[{"odd": i % 2} for i in range(3000)])
    settings = [{"k": 5}, {"k": 10}, {"k": 10, "filter": {"odd": 1}}, {"k": 10, "nprobe": 8}]
    expected = [[h.id for h in col.search(q, **settings[i % 4])] for i, q in enumerate(queries)]  # type: ignore[arg-type]

    def one(i: int) -> list[str]:
        if i % 10 == 9:  # a bad request in the crowd fails alone
            with pytest.raises(InvalidArgumentError):
                col.search(queries[i][:100], k=10)
            return ["bad"]
        return [h.id for h in col.search(queries[i], **settings[i % 4])]  # type: ignore[arg-type]

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, range(len(queries))))
    for i, ids in enumerate(got):
        assert ids == (["bad"] if i % 10 == 9 else expected[i])
    client.close()


class _Work:
    """A search that holds its thread until `gate` opens, and one that records its batch sizes."""

    def __init__(self) -> None:
        self.started, self.gate, self.calls = threading.Event(), threading.Event(), list[int]()

    def hold(self) -> bool:
        self.started.set()
        return self.gate.wait()

    def run(self, vectors: np.ndarray) -> list[list[str]]:
        self.calls.append(len(vectors))
        return [[f"q{int(v[0])}"] for v in vectors]


def test_a_crowd_of_singles_is_answered_by_one_batch_and_errors_reach_their_caller() -> None:
    """While the search thread is busy, more than batch_from single queries with one key queue up:
    one stacked call answers them, in order; fewer run one by one; a failing call raises in its caller."""

    coalescer = SearchCoalescer(batch_from=4)
    work = _Work()
    started, gate, calls, hold, run = work.started, work.gate, work.calls, work.hold, work.run

    with ThreadPoolExecutor(12) as pool:
        blocker = pool.submit(coalescer.run_alone, hold)
        assert started.wait(5)  # the search thread is busy from here on
        crowd = [pool.submit(coalescer.search, "crowd", np.array([i], np.float32), run) for i in range(6)]
        few = [pool.submit(coalescer.search, "few", np.array([i], np.float32), run) for i in range(2)]
        deadline = time.time() + 10
        while len(coalescer._pending) < 8 and time.time() < deadline:  # all eight queue behind the blocker
            time.sleep(0.01)
        assert len(coalescer._pending) == 8
        gate.set()
        assert blocker.result(5) is True
        assert [f.result(5) for f in crowd] == [[f"q{i}"] for i in range(6)]
        assert [f.result(5) for f in few] == [["q0"], ["q1"]]
    assert sorted(calls) == [1, 1, 6]

    def fail() -> None:
        raise InvalidArgumentError("k: bad", field="k")

    with pytest.raises(InvalidArgumentError, match="k: bad"):
        coalescer.run_alone(fail)
    assert coalescer.search("after", np.array([7], np.float32), run) == ["q7"]  # the thread survived


def test_two_search_threads_answer_side_by_side_and_still_batch_crowds() -> None:
    """With threads=2 a search that holds one thread does not hold up the others' queries; a crowd
    of one key behind a busy pool is still answered by one stacked call."""
    coalescer = SearchCoalescer(batch_from=2, threads=2)
    work = _Work()
    started, gate, calls, hold, run = work.started, work.gate, work.calls, work.hold, work.run

    with ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(coalescer.run_alone, hold)
        assert started.wait(5)
        # the second thread is free: a single query is answered while the first is held
        assert pool.submit(coalescer.search, "free", np.array([3], np.float32), run).result(5) == ["q3"]
        second = pool.submit(coalescer.run_alone, hold)  # now both threads are held
        deadline = time.time() + 5
        while coalescer._pending and time.time() < deadline:
            time.sleep(0.01)
        crowd = [pool.submit(coalescer.search, "crowd", np.array([i], np.float32), run) for i in range(4)]
        while len(coalescer._pending) < 4 and time.time() < deadline + 5:
            time.sleep(0.01)
        assert len(coalescer._pending) == 4
        gate.set()
        assert blocker.result(5) is True and second.result(5) is True
        assert [f.result(5) for f in crowd] == [[f"q{i}"] for i in range(4)]
    assert calls == [1, 4]
    with pytest.raises(ValueError, match="threads"):
        SearchCoalescer(threads=0)


def test_a_free_turn_runs_on_the_callers_thread_and_the_lead_passes_in_arrival_order() -> None:
    """No hand-off when no search is running; queued requests run oldest first, each on its own
    thread once led there, and the lead count returns to zero."""
    coalescer = SearchCoalescer(batch_from=16)
    work = _Work()
    ran_on: list[tuple[int, str]] = []

    def run(vectors: np.ndarray) -> list[list[str]]:
        ran_on.append((int(vectors[0][0]), threading.current_thread().name))
        return [["ok"] for _ in vectors]

    assert coalescer.search("k", np.array([0], np.float32), run) == ["ok"]
    assert ran_on == [(0, threading.current_thread().name)]
    asked_on: dict[int, str] = {}

    def ask(i: int) -> list[Hit]:
        asked_on[i] = threading.current_thread().name
        return coalescer.search("k", np.array([i], np.float32), run)

    with ThreadPoolExecutor(6) as pool:
        blocker = pool.submit(coalescer.run_alone, work.hold)
        assert work.started.wait(5)
        waiting = []
        for i in range(1, 5):  # queued one by one, so their arrival order is known
            waiting.append(pool.submit(ask, i))
            deadline = time.time() + 5
            while len(coalescer._pending) < i and time.time() < deadline:
                time.sleep(0.005)
        work.gate.set()
        assert blocker.result(5) and all(f.result(5) == ["ok"] for f in waiting)
    assert [i for i, _ in ran_on[1:]] == [1, 2, 3, 4]
    assert all(name == asked_on[i] for i, name in ran_on[1:])
    assert coalescer._leaders == 0 and not coalescer._pending


@pytest.mark.parametrize("threads", [1, 2])
def test_many_callers_each_get_their_own_answer_and_no_lead_is_lost(threads: int) -> None:
    coalescer = SearchCoalescer(batch_from=3, threads=threads)
    rng = np.random.default_rng(threads)
    delays = rng.random(400) * 0.002

    def run(vectors: np.ndarray) -> list[list[str]]:
        time.sleep(float(delays[int(vectors[0][0])]))
        return [[f"q{int(v[0])}"] for v in vectors]

    def one(i: int) -> list[str]:
        if i % 50 == 7:
            return [str(coalescer.run_alone(lambda: i * 2))]
        return coalescer.search(f"key{i % 3}", np.array([i], np.float32), run)  # type: ignore[return-value]

    with ThreadPoolExecutor(24) as pool:
        got = list(pool.map(one, range(400)))
    assert got == [[str(i * 2)] if i % 50 == 7 else [f"q{i}"] for i in range(400)]
    assert coalescer._leaders == 0 and not coalescer._pending
