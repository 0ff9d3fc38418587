"""A readers-writer lock: searches run in parallel (numpy and faiss release the GIL), writes alone."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class ReadWriteLock:
    """Writer-preferring: once a writer waits, new readers queue behind it (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._exclusive = threading.Lock()

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self.exclusive(), self.readers_out():
            yield

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Other writers wait; readers go on. For long writes that prepare their change without
        touching what readers see, then swap it in under `readers_out()`."""
        with self._exclusive:
            yield

    @contextmanager
    def readers_out(self) -> Iterator[None]:
        """Wait for running readers and hold new ones back (call inside `exclusive()`)."""
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class PerPath(Generic[T]):
    """One open resource per path per process, counted by its users and closed with the last:
    LMDB wants one environment per path, tantivy one writer per index."""

    def __init__(self, open_: Callable[[Path], T], close: Callable[[T], None]) -> None:
        self._open, self._close = open_, close
        self._held: dict[str, tuple[T, int]] = {}
        self._lock = threading.Lock()

    def acquire(self, path: Path) -> T:
        key = str(path.resolve())
        with self._lock:
            resource, refs = self._held.get(key) or (self._open(path), 0)
            self._held[key] = (resource, refs + 1)
            return resource

    def release(self, path: Path) -> None:
        key = str(path.resolve())
        with self._lock:
            if key not in self._held:
                return
            resource, refs = self._held[key]
            if refs > 1:
                self._held[key] = (resource, refs - 1)
            else:
                del self._held[key]
                self._close(resource)
