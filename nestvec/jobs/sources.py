"""Streamed inputs of bulk jobs: JSONL(.gz), Parquet and plain text, read in batches, with
precomputed vectors (an .npy of one row per document) beside them.

A position counts documents from the start of the input (a JSONL or text document is a non-empty
line, a Parquet document a row), so a job can checkpoint "the first N are in" and a resumed job
skips exactly N. Nothing holds more than one batch.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nestvec.datasets import Document, document_from_row, iter_corpus
from nestvec.errors import NotFoundError, invalid

FORMATS = ("auto", "jsonl", "parquet", "text")
PARQUET_ID_COLUMNS = ("_id", "id")


@dataclass(frozen=True)
class Batch:
    start: int                     # input position of the first document
    documents: list[Document]
    vectors: np.ndarray | None     # [len(documents), dim] float32 when the job brings its own

    @property
    def end(self) -> int:
        return self.start + len(self.documents)


def detect_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if ".parquet" in suffixes:
        return "parquet"
    if ".jsonl" in suffixes or ".json" in suffixes:
        return "jsonl"
    return "text"


class Source:
    """One input file (and optional vectors), read from any position in batches."""

    def __init__(self, path: Path | str, *, fmt: str = "auto", vectors: Path | str | None = None,
                 limit: int = 0) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise NotFoundError(f"{self.path}: no such file")
        if fmt not in FORMATS:
            raise invalid("format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if limit < 0:
            raise invalid("limit", f"must be >= 0, got {limit}")
        self.format = detect_format(self.path) if fmt == "auto" else fmt
        self.limit = limit
        self.vectors_path = Path(vectors) if vectors is not None else None
        self._vectors: np.ndarray | None = None
        if self.vectors_path is not None:
            if not self.vectors_path.exists():
                raise NotFoundError(f"{self.vectors_path}: no such file")
            try:
                self._vectors = np.load(self.vectors_path, mmap_mode="r")  # rows are read batch by batch
            except ValueError as err:
                raise invalid("vectors", f"{self.vectors_path} is not a .npy array: {err}") from None
            if self._vectors.ndim != 2 or not np.issubdtype(self._vectors.dtype, np.floating):
                raise invalid("vectors", f"{self.vectors_path} must hold a 2-D float array, got "
                                         f"{self._vectors.dtype} {self._vectors.shape}")

    @property
    def dim(self) -> int | None:
        return None if self._vectors is None else int(self._vectors.shape[1])

    def fingerprint(self) -> str:
        """Changes when the input (or its vectors) is replaced: a checkpoint only resumes the same input."""
        parts = []
        for path in (self.path, self.vectors_path):
            if path is not None:
                stat = path.stat()
                parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
        return hashlib.sha256(f"{'|'.join(parts)}|{self.format}|{self.limit}".encode()).hexdigest()[:24]

    def job_name(self) -> str:
        """The checkpoint's name: the same input ingested again finds its own checkpoint."""
        vectors = f"+{self.vectors_path.resolve()}" if self.vectors_path else ""
        digest = hashlib.sha256(f"{self.path.resolve()}{vectors}".encode()).hexdigest()[:16]
        return f"ingest:{self.path.name}:{digest}"

    def count(self) -> int:
        """Documents in the input (up to the limit), reading it all once: a malformed line is
        reported (file and line) before anything is written, and the progress bar knows its total."""
        n = sum(len(batch.documents) for batch in self._documents(0, 4096, with_vectors=False))
        if self._vectors is not None and len(self._vectors) < n:
            raise invalid("vectors", f"{self.vectors_path} has {len(self._vectors)} rows for {n} documents "
                                     f"(use --limit {len(self._vectors)} to ingest only those)")
        return n

    def batches(self, start: int, size: int, *, first: int | None = None) -> Iterator[Batch]:
        """Batches of `size` documents from position `start` on (the first one `first` long)."""
        if size < 1 or (first is not None and first < 1):
            raise invalid("batch_size", f"must be >= 1, got {size if size < 1 else first}")
        yield from self._documents(start, size, with_vectors=True, first=first)

    def _vector_rows(self, at: int, count: int) -> np.ndarray:
        """Rows at..at+count as float32, read from the file rather than through the memory map:
        pages read through a map stay resident, so a 150k ingest ended holding all 115 MB of its
        vectors file (the map only gives the shape, dtype and header size)."""
        mapped = self._vectors
        assert mapped is not None and self.vectors_path is not None
        count = max(0, min(count, len(mapped) - at))
        if not mapped.flags.c_contiguous or not isinstance(mapped, np.memmap):  # Fortran order: rare
            return np.asarray(mapped[at:at + count], dtype=np.float32)
        row_bytes = mapped.shape[1] * mapped.dtype.itemsize
        rows = np.fromfile(self.vectors_path, dtype=mapped.dtype, count=count * mapped.shape[1],
                           offset=mapped.offset + at * row_bytes)
        return rows.reshape(count, mapped.shape[1]).astype(np.float32, copy=False)

    def _documents(self, start: int, size: int, *, with_vectors: bool, first: int | None = None) -> Iterator[Batch]:
        stop = self.limit or None
        docs = self._parquet_documents(start) if self.format == "parquet" else itertools.islice(
            self._line_documents(), start, None)
        if stop is not None:
            docs = itertools.islice(docs, max(0, stop - start))
        at, take = start, first or size
        while chunk := list(itertools.islice(docs, take)):
            take = size
            vectors = None
            if with_vectors and self._vectors is not None:
                vectors = self._vector_rows(at, len(chunk))
                if len(vectors) != len(chunk):
                    raise invalid("vectors", f"{self.vectors_path} has no rows for documents {at}..{at + len(chunk)}")
            yield Batch(at, chunk, vectors)
            at += len(chunk)

    def _line_documents(self) -> Iterator[Document]:
        if self.format == "jsonl":
            yield from iter_corpus(self.path)
            return
        with open(self.path, encoding="utf-8") as fh:  # plain text: ids are line numbers
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    yield Document(str(lineno), line.rstrip("\n"))

    def _parquet_documents(self, start: int) -> Iterator[Document]:
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow is a dependency
            raise invalid("format", "reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            parquet = pq.ParquetFile(self.path)
        except Exception as err:  # pyarrow raises its own error types for a bad file
            raise invalid("path", f"{self.path} is not a Parquet file: {err}") from None
        names = parquet.schema_arrow.names
        id_column = next((c for c in PARQUET_ID_COLUMNS if c in names), None)
        if id_column is None or "text" not in names:
            raise invalid("path", f"{self.path}: a Parquet input needs an '_id' (or 'id') and a 'text' column, "
                                  f"found {names}")
        columns = [c for c in (id_column, "title", "text", "metadata") if c in names]
        first, skipped = 0, 0  # whole row groups before the start are not read
        while first < parquet.num_row_groups and skipped + parquet.metadata.row_group(first).num_rows <= start:
            skipped += parquet.metadata.row_group(first).num_rows
            first += 1
        position = skipped
        for record_batch in parquet.iter_batches(batch_size=4096, row_groups=range(first, parquet.num_row_groups),
                                                 columns=columns):
            for row in record_batch.to_pylist():
                if position >= start:
                    yield document_from_row(row, f"{self.path}: row {position}", (id_column,))
                position += 1
