"""Readers for BEIR-layout data (corpus.jsonl[.gz], queries.jsonl, qrels/*.tsv) and plain text."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from nestvec.errors import InvalidArgumentError, NotFoundError
from nestvec.types import JSONDict


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    metadata: JSONDict = field(default_factory=dict)


def _open_text(path: Path) -> IO[str]:
    if not path.exists():
        raise NotFoundError(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def document_text(title: str, text: str) -> str:
    """BEIR's convention (and that of the shipped embeddings): "<title>. <text>"."""
    title, text = title.strip(), text.strip()
    return f"{title}. {text}" if title and text else title or text


def iter_corpus(path: Path | str) -> Iterator[Document]:
    """Documents of a BEIR corpus.jsonl[.gz] or of a plain text file (one document per line).

    Malformed JSON lines raise InvalidArgumentError naming the file and line number.
    """
    path = Path(path)
    is_jsonl = ".jsonl" in path.suffixes or ".json" in path.suffixes
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if not is_jsonl:
                yield Document(str(lineno), line.rstrip("\n"))
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise InvalidArgumentError(f"{path}:{lineno}: malformed line: {err}", field="corpus") from None
            yield document_from_row(row, f"{path}:{lineno}")


def document_from_row(row: object, where: str, id_columns: tuple[str, ...] = ("_id", "id")) -> Document:
    """A BEIR-style record (id, title, text, metadata) as a Document; `where` names the line or row
    in the error for a malformed one."""
    try:
        if not isinstance(row, dict):
            raise ValueError("not a JSON object")
        doc_id = next((row[c] for c in id_columns if row.get(c) is not None), None)
        if doc_id is None or isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
            raise ValueError(f"missing '{id_columns[0]}'")
        title, text = row.get("title") or "", row.get("text") or ""
        if not isinstance(title, str) or not isinstance(text, str):
            raise ValueError("'title' and 'text' must be strings")
    except ValueError as err:
        raise InvalidArgumentError(f"{where}: malformed line: {err}", field="corpus") from None
    metadata = row.get("metadata")
    if isinstance(metadata, str):  # Parquet files often carry it as a JSON string
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            metadata = None
    return Document(str(doc_id), document_text(title, text), metadata if isinstance(metadata, dict) else {})


def load_queries(path: Path | str) -> dict[str, str]:
    return {doc.id: doc.text for doc in iter_corpus(path)}


def load_qrels(path: Path | str) -> dict[str, dict[str, int]]:
    """query id -> {doc id: graded relevance}; the header line of BEIR files is skipped."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    with _open_text(path) as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter="\t"), start=1):
            if not row or (lineno == 1 and row[0] == "query-id"):
                continue
            try:
                qid, did, score = row[0], row[1], int(row[2])
            except (IndexError, ValueError):
                raise InvalidArgumentError(f"{path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score'",
                                           field="qrels") from None
            qrels.setdefault(qid, {})[did] = score
    return qrels
