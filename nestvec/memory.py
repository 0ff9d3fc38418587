"""Handing memory back to the OS after index maintenance and bulk writes.

A flush or a rebuild allocates and frees many list-sized buffers (tens to hundreds of KB each).
glibc serves them from its heap once its dynamic mmap threshold has risen, and the holes left
behind are not returned: measured on 60,000 wiki250k inserts into a SPANN collection, anonymous
memory grew 111 MB, and 24 MB after malloc_trim. No allocator setting does this per call site,
so the trim is called by hand where the churn happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import time
from pathlib import Path
from typing import Any

_libc: Any = None
try:
    _name = ctypes.util.find_library("c")
    _libc = ctypes.CDLL(_name, use_errno=True) if _name else None
except OSError:
    _libc = None
_malloc_trim: Any = getattr(_libc, "malloc_trim", None)  # glibc only (not musl, not macOS)
_madvise: Any = getattr(_libc, "madvise", None)
if _madvise is not None:
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

MADV_WILLNEED = 3
# MADV_DONTNEED on a shared file mapping only unmaps pages from this process: the data stays in
# the page cache (dirty pages included, written back as usual) and the next touch maps it again.
MADV_DONTNEED = 4
CAN_MADVISE = _madvise is not None


def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) on [address, address + length), widened to whole pages; a no-op without libc."""
    if _madvise is not None and length > 0:
        start = address - address % mmap.PAGESIZE
        _madvise(start, address + length - start, advice)


class StorageReads:
    """Whether this process has read from storage lately, so that page hints (madvise WILLNEED)
    are sent only when they can pay: a hint is a system call per posting list, 0.15 ms of a
    1.2 ms SPANN query on 100k cached vectors, and buys nothing when the pages are in memory.
    /proc/self/io's read_bytes counts the reads that faults and the hints' own readahead start,
    so under a memory cap it keeps rising and hinting stays on; it is checked once a window.
    Where the file cannot be read, hinting is always on.

    A window counts as reading only past `min_bytes`: a served 100k collection read 4-8 KB now and
    then (a document page, a lazily imported module), and each such read turned hints on for a
    whole window, where the hinted read path cost 0.63 ms per query against 0.12 ms (in process,
    under cProfile). A query missing its cached lists reads megabytes, far above the bar."""

    def __init__(self, window_s: float = 1.0, source: str = "/proc/self/io", min_bytes: int = 256 << 10) -> None:
        self.window_s, self.source, self.min_bytes = window_s, source, min_bytes
        self._bytes = self._read_bytes()
        self._lately = True  # a fresh process has not proven its pages cached
        self._next_check = time.monotonic() + window_s

    def _read_bytes(self) -> int | None:
        try:
            with open(self.source, encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("read_bytes:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def lately(self) -> bool:
        now = time.monotonic()
        if now >= self._next_check:
            current = self._read_bytes()
            self._lately = current is None or self._bytes is None or current - self._bytes > self.min_bytes
            self._bytes, self._next_check = current, now + self.window_s
        return self._lately


storage_reads = StorageReads()


def trim_heap() -> None:
    """Return free heap pages to the OS (glibc); a no-op elsewhere. Costs about a millisecond."""
    if _malloc_trim is not None:
        _malloc_trim(0)


RELEASE_STEP = 16 << 20


class MappedFile:
    """Keeps the pages of a memory-mapped file (LMDB's map) that bulk work touches from piling
    up in this process's resident set.

    LMDB writes through its map (writemap), so every page a bulk load writes or reads stays
    mapped: a 150k ingest ended at 880 MB resident, 600 MB of it LMDB pages, though the process
    itself needed a quarter of that. Writers charge the bytes they move; every RELEASE_STEP the
    file's pages are unmapped here. Search reads are not charged: serving keeps its pages.
    Hand-written because Python cannot name LMDB's map address: the mappings are found in
    /proc/self/maps and released with madvise (Linux; a no-op elsewhere)."""

    def __init__(self, file: Path, step: int = RELEASE_STEP) -> None:
        self.file, self.step = str(file.resolve()), step
        self._charged = 0
        self.releases = 0

    def charge(self, nbytes: int) -> None:
        self._charged += nbytes
        if self._charged >= self.step:
            self._charged = 0
            self.release()

    def release(self) -> None:
        if not CAN_MADVISE:
            return
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
                spans = [line.split(maxsplit=1)[0] for line in fh if line.rstrip("\n").endswith(self.file)]
        except OSError:  # not Linux
            return
        for span in spans:
            low, high = (int(part, 16) for part in span.split("-"))
            madvise(low, high - low, MADV_DONTNEED)
        self.releases += 1


_MAPPED: dict[str, MappedFile] = {}


def mapped_file(file: Path) -> MappedFile:
    """One tracker per file, shared by every store that writes through the same map."""
    key = str(file.resolve())
    if key not in _MAPPED:
        _MAPPED[key] = MappedFile(file)
    return _MAPPED[key]
