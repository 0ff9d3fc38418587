"""Corpus readers: BEIR JSONL (plain and gzipped), plain text, qrels; errors name file and line."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from nestvec.cli import main as cli
from nestvec.client import connect
from nestvec.datasets import iter_corpus, load_qrels, load_queries
from nestvec.errors import InvalidArgumentError, NotFoundError
from realdata import DATA, corpus_slice


def test_jsonl_and_gzip_give_the_same_documents(tmp_path: Path) -> None:
    plain = corpus_slice("scifact", tmp_path, list(range(30)))
    zipped = tmp_path / "corpus.jsonl.gz"
    with gzip.open(zipped, "wt", encoding="utf-8") as fh:
        fh.write(plain.read_text(encoding="utf-8"))
    docs = list(iter_corpus(plain))
    assert docs == list(iter_corpus(zipped))
    assert len(docs) == 30 and docs[0].text.startswith(docs[0].text.split(". ")[0] + ". ")


def test_plain_text_is_one_document_per_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("first note\n\nsecond note\n", encoding="utf-8")
    assert [(d.id, d.text) for d in iter_corpus(path)] == [("1", "first note"), ("3", "second note")]
    assert cli(["--data", str(tmp_path / "s"), "ingest", str(path), "--collection", "notes"]) == 0
    col = connect(tmp_path / "s").get_collection("notes")
    assert col.count() == 2 and col.search("second", k=1)[0].id == "3"


@pytest.mark.parametrize(("line", "problem"), [
    ('{"_id": "x", "text": oops}', "malformed"),
    ('["not", "an", "object"]', "not a JSON object"),
    ('{"text": "no id"}', "_id"),
    ('{"_id": "x", "text": 5}', "must be strings"),
])
def test_malformed_lines_name_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"_id": "a", "text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(InvalidArgumentError, match=rf"bad\.jsonl:2: .*{problem}"):
        list(iter_corpus(path))


def test_queries_and_qrels_of_the_real_data() -> None:
    queries = load_queries(DATA / "cranfield" / "queries.jsonl")
    qrels = load_qrels(DATA / "cranfield" / "qrels" / "test.tsv")
    assert len(queries) == 225 and len(qrels) == 225
    assert sum(len(j) for j in qrels.values()) == 1612


def test_bad_qrels_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "qrels.tsv"
    bad.write_text("query-id\tcorpus-id\tscore\nq1\td1\n", encoding="utf-8")
    with pytest.raises(InvalidArgumentError, match=r"qrels\.tsv:2"):
        load_qrels(bad)
    with pytest.raises(NotFoundError):
        list(iter_corpus(tmp_path / "missing.jsonl"))
