"""Every bad input raises a clear error naming the problem and leaves stored data unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nestvec.cli import main as cli
from nestvec.client.local import LocalClient
from nestvec.collection import Collection
from nestvec.encoders import SentenceTransformerEncoder
from nestvec.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from nestvec.types import EncoderIdentity
from realdata import DATA, corpus_slice


def _snapshot(col: Collection) -> tuple[int, list, list]:
    ids = sorted(col._row_of)
    return col.count(), col.get(ids), [(h.id, h.score) for h in col.search(np.ones(col.config.dim), k=20)]


@pytest.fixture()
def filled(client: LocalClient, scifact_vectors: tuple[list[str], np.ndarray]) -> Collection:
    ids, vecs = scifact_vectors
    col = client.create_collection("bad", encoder=None, dim=384, codec="fp8")
    col.upsert(ids[:100], vectors=vecs[:100], texts=[f"t{i}" for i in range(100)],
               metadata=[{"year": 2000 + i % 5} for i in range(100)])
    return col


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ids": ["x1", "x2"], "vectors": "nan"}, "vectors[1]"),
        ({"ids": ["x1", "x2"], "vectors": "inf"}, "vectors[1]"),
        ({"ids": ["x1", "x2"], "vectors": "dim"}, "vectors"),
        ({"ids": ["x1", "x1"], "vectors": "ok"}, "ids"),
        ({"ids": [], "vectors": None}, "ids"),
        ({"ids": ["x1", ""], "vectors": "ok"}, "ids[1]"),
        ({"ids": ["x1", "x2"], "vectors": "ok", "metadata": [{"a": 1}]}, "metadata"),
        ({"ids": ["x1", "x2"], "vectors": "ok", "metadata": [{"a": 1}, {"b": float("nan")}]}, "metadata[1]"),
        ({"ids": ["x1", "x2"], "vectors": "ok", "metadata": [{"a": 1}, {"b": object()}]}, "metadata[1]"),
        ({"ids": ["x1", "x2"], "vectors": "zero"}, "vectors[0]"),
        ({"ids": ["x1", "x2"], "vectors": None}, "texts"),
    ],
)
def test_bad_upserts_change_nothing(filled: Collection, kwargs: dict, field: str) -> None:
    before = _snapshot(filled)
    vectors = {"ok": np.ones((2, 384)), "nan": np.array([np.ones(384), [np.nan] * 384]),
               "inf": np.array([np.ones(384), [np.inf] * 384]), "dim": np.ones((2, 383)),
               "zero": np.zeros((2, 384)), None: None}[kwargs.pop("vectors")]
    with pytest.raises(InvalidArgumentError) as err:
        filled.upsert(vectors=vectors, **kwargs)
    assert err.value.field == field and field.split("[")[0] in str(err.value)
    assert _snapshot(filled) == before


def test_texts_on_a_vector_only_collection_are_refused(filled: Collection) -> None:
    before = _snapshot(filled)
    with pytest.raises(FailedPreconditionError, match="no encoder"):
        filled.upsert(["x"], texts=["hello"])
    assert _snapshot(filled) == before


@pytest.mark.parametrize(
    ("flt", "match"),
    [
        ({"missing_field": 1}, "missing_field"),
        ({"year": {"$approx": 2001}}, r"\$approx"),
        ({"$nor": [{"year": 2001}]}, r"\$nor"),
        ({"year": {"$gt": "2001"}}, "needs a number"),
        ({"year": {"$in": 2001}}, "needs a list"),
        ({"$and": {"year": 2001}}, "non-empty list"),
        ("year = 2001", "JSON object"),
    ],
)
def test_bad_filters_are_refused(filled: Collection, flt: object, match: str) -> None:
    before = _snapshot(filled)
    with pytest.raises(InvalidArgumentError, match=match) as err:
        filled.search(np.ones(384), k=5, filter=flt)  # type: ignore[arg-type]
    assert err.value.field is not None and err.value.field.startswith("filter")
    assert _snapshot(filled) == before


@pytest.mark.parametrize("k", [0, -1, 10_001, 2.5, True])
def test_k_out_of_range(filled: Collection, k: object) -> None:
    with pytest.raises(InvalidArgumentError, match="k"):
        filled.search(np.ones(384), k=k)  # type: ignore[arg-type]


def test_bad_queries(filled: Collection) -> None:
    with pytest.raises(InvalidArgumentError, match="wrong dimension"):
        filled.search(np.ones(512), k=3)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        filled.search(np.full(384, np.nan), k=3)
    with pytest.raises(InvalidArgumentError, match="empty batch"):
        filled.search_batch(np.zeros((0, 384)), k=3)
    with pytest.raises(InvalidArgumentError, match="empty batch"):
        filled.search_batch([], k=3)
    with pytest.raises(FailedPreconditionError, match="all-mpnet-base-v2"):
        filled.search(np.ones(384), k=3, model="all-mpnet-base-v2")


def test_query_vectors_from_another_model_are_refused(client: LocalClient,
                                                      encoder: SentenceTransformerEncoder) -> None:
    col = client.create_collection("m", codec="fp32")
    col.upsert(["a"], texts=["hello"])
    assert col.search(encoder.encode("hello", kind="query"), k=1, model="all-MiniLM-L6-v2")[0].id == "a"
    with pytest.raises(FailedPreconditionError, match="other-model"):
        col.search(np.ones(384), k=1, model="other-model")

    class OtherEncoder:
        identity = EncoderIdentity("other-model", "0" * 64, 384)
        dim = 384

        def encode(self, texts, *, kind="document", dim=None, show_progress=None):  # type: ignore[no-untyped-def]
            return np.ones((len(texts), 384), dtype=np.float32)

    client.close()
    with pytest.raises(FailedPreconditionError, match="differs"):
        client.get_collection("m", encoder=OtherEncoder())  # type: ignore[arg-type]


def test_unknown_collection_and_codec(client: LocalClient) -> None:
    with pytest.raises(NotFoundError, match="ghost"):
        client.get_collection("ghost")
    with pytest.raises(InvalidArgumentError, match="codec"):
        client.create_collection("c", encoder=None, dim=8, codec="fp9")
    with pytest.raises(InvalidArgumentError, match="name"):
        client.create_collection("../escape", encoder=None, dim=8)
    assert client.list_collections() == []


def test_cli_reports_malformed_jsonl_line_and_writes_nothing(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "store"
    good = corpus_slice("cranfield", tmp_path, list(range(5)))
    assert cli(["--data", str(data), "ingest", str(good), "--collection", "cran", "--codec", "fp16"]) == 0
    lines = good.read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([lines[0].replace('"1"', '"new1"'), lines[1], '{"_id": "9", "text": oops', *lines[3:]]))
    assert cli(["--data", str(data), "ingest", str(broken), "--collection", "cran"]) == 2
    assert "broken.jsonl:3" in capsys.readouterr().err
    from nestvec import connect

    col = connect(data).get_collection("cran")
    assert col.count() == 5 and col.get(["new1"]) == [None]


def test_empty_cranfield_documents_ingest(tmp_path: Path) -> None:
    lines = (DATA / "cranfield" / "corpus.jsonl").read_text().splitlines()
    empty = [i for i, line in enumerate(lines) if '"_id": "471"' in line or '"_id": "995"' in line]
    corpus = corpus_slice("cranfield", tmp_path, [*empty, 0, 1, 2])
    assert cli(["--data", str(tmp_path / "store"), "ingest", str(corpus), "--collection", "cran"]) == 0
    from nestvec import connect

    col = connect(tmp_path / "store").get_collection("cran")
    records = col.get(["471", "995"])
    assert col.count() == 5 and all(r is not None and r.text == "" for r in records)
