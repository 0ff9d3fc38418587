"""A readers-writer lock: searches run in parallel (numpy and faiss release the GIL), writes alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


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
