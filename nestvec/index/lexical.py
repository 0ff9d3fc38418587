"""The full-text side of a collection: a tantivy index (English stemming, BM25) of id and text,
on disk beside the LMDB store.

The two stores commit separately. Each LMDB write batch carries a sequence number; this index
records the last sequence it has applied as a document of its own, replaced in the same tantivy
commit as the changes, so after a crash the collection knows which logged batches to replay.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tantivy

from nestvec.concurrency import PerPath
from nestvec.fsutil import folder_bytes

_APPLIED = "\x00applied"  # the id of the document holding the applied sequence number
# Runs of letters and digits: the tokenizer splits words at anything else (an underscore too), and
# a query word it splits in two would become a phrase query, which this index (no positions) refuses.
_WORD = re.compile(r"[^\W_]+")
WRITER_HEAP = 32_000_000
# Parsing and scoring cost grows with the query's words: a 10 MB query held the search thread for
# 6 s (API fuzzer). 65,536 characters are ~10,000 words, searched in ~40 ms on SciFact.
MAX_QUERY_CHARS = 65_536


def plain_words(query: str) -> str:
    """The query as lower-case words only: quotes, colons, brackets, AND/OR/NOT, *, ~ and ^ are
    searched as the words around them, never parsed as query syntax. Lower-cased before it is split:
    "İ".lower() is "i" and a combining dot, which split one word in two, a phrase query (API fuzzer)."""
    return " ".join(_WORD.findall(query.lower()))


class LexicalIndex:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        builder = tantivy.SchemaBuilder()
        builder.add_text_field("id", stored=True, tokenizer_name="raw", index_option="basic")
        builder.add_text_field("text", stored=False, tokenizer_name="en_stem", index_option="freq")
        builder.add_integer_field("applied", stored=True)
        self.index = tantivy.Index(builder.build(), path=str(folder), reuse=True)
        self._writer: tantivy.IndexWriter | None = None  # taken on the first write: readers elsewhere need none
        self._closed = False
        self.index.reload()
        self.applied = self._read_applied()

    def ids(self) -> set[str]:
        """Every id the index holds (a consistency check against the vector store)."""
        searcher = self.index.searcher()
        hits = searcher.search(tantivy.Query.all_query(), max(searcher.num_docs, 1), count=False).hits
        return {searcher.doc(address)["id"][0] for _, address in hits} - {_APPLIED}

    def disk_bytes(self) -> int:
        return folder_bytes(self.folder)

    def _open_writer(self) -> tantivy.IndexWriter:
        if self._closed:
            raise RuntimeError("the lexical index is closed")
        if self._writer is None:
            self._writer = self.index.writer(WRITER_HEAP, 1)
        return self._writer

    def settle(self) -> None:
        """Wait for the writer's background segment merges and let the writer go (a new one is
        taken on the next write): after a bulk load the merges otherwise ran on for seconds,
        taking CPU from the searches that followed."""
        if self._writer is not None:
            self._writer.wait_merging_threads()
            self._writer = None
            self.index.reload()

    def discard(self) -> None:
        """Drop the writer and what it staged: after a failed commit (a full disk) tantivy's writer
        is dead; the next write takes a new one."""
        self._writer = None

    def close(self) -> None:
        """Drop the writer, which releases the index's writer lock (the folder can be opened again)."""
        self._writer, self._closed = None, True

    def _read_applied(self) -> int:
        """The last sequence number committed here; -1 for a new index."""
        searcher = self.index.searcher()
        found = searcher.search(tantivy.Query.term_query(self.index.schema, "id", _APPLIED), 1).hits
        if not found:
            return -1
        return int(searcher.doc(found[0][1])["applied"][0])

    def stage(self, upserts: Sequence[tuple[str, str | None]], deletes: Sequence[str]) -> None:
        """Replace or remove documents (visible after `commit`). A document without text is kept
        out of the index: it can never match a lexical query."""
        writer = self._open_writer()
        for key in [*deletes, *(key for key, _ in upserts)]:
            writer.delete_documents_by_term("id", key)
        for key, text in upserts:
            if text:
                writer.add_document(tantivy.Document(id=key, text=text))

    def commit(self, sequence: int) -> None:
        """Publish what was staged together with the sequence number it brings this index up to."""
        writer = self._open_writer()
        writer.delete_documents_by_term("id", _APPLIED)
        writer.add_document(tantivy.Document(id=_APPLIED, applied=sequence))
        writer.commit()
        self.index.reload()
        self.applied = sequence

    def search(self, query: str, k: int, allowed: Callable[[list[str]], np.ndarray] | None = None,
               ) -> tuple[list[str], np.ndarray]:
        """Top-k (ids, BM25 scores), best first; `allowed(ids)` masks out what a filter excludes.
        A query with no words returns nothing; one is read up to its first MAX_QUERY_CHARS characters."""
        words = plain_words(query[:MAX_QUERY_CHARS])
        if not words:
            return [], np.zeros(0, dtype=np.float32)
        parsed = self.index.parse_query(words, ["text"])
        searcher = self.index.searcher()
        depth = k if allowed is None else max(4 * k, 100)
        total = searcher.num_docs
        while True:
            hits = searcher.search(parsed, depth, count=False).hits
            ids = [searcher.doc(address)["id"][0] for _, address in hits]
            scores = np.array([score for score, _ in hits], dtype=np.float32)
            keep = [i for i, key in enumerate(ids) if key != _APPLIED]
            if allowed is not None and keep:
                mask = allowed([ids[i] for i in keep])
                keep = [i for i, ok in zip(keep, mask.tolist(), strict=True) if ok]
            if len(keep) >= k or len(hits) < depth or depth >= total:
                keep = keep[:k]
                return [ids[i] for i in keep], scores[keep]
            depth *= 4


# One LexicalIndex per folder per process, shared by every collection object opened on it.
_OPEN: PerPath[LexicalIndex] = PerPath(LexicalIndex, lambda index: index.close())
open_lexical, release_lexical = _OPEN.acquire, _OPEN.release
