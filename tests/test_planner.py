"""The compression planner on real Cranfield embeddings: it measures every candidate, never picks
one over the budget, ranks codecs sensibly without labels, and refuses bad input by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nestvec.compression.planner import Labels, candidate_specs, ndcg_at_10, plan, plot
from nestvec.errors import InvalidArgumentError
from realdata import shipped_embeddings

SPECS = ["fp16", "int8", "pca192+int8", "pca96+int8", "pca48+int8", "binary", "binary+rescore:int8"]


@pytest.fixture(scope="module")
def cranfield() -> np.ndarray:
    return np.ascontiguousarray(shipped_embeddings("cranfield")[1][:1200], dtype=np.float32)


def test_candidates_cover_every_family() -> None:
    specs = candidate_specs(384, matryoshka=True)
    assert {"fp16", "fp8", "fp8e5m2", "int8", "binary", "binary+rescore:int8"} <= set(specs)
    assert {"pca192+fp8", "pca96+int8", "pca48+fp8e5m2", "mrl192+fp8", "mrl48+fp8"} <= set(specs)
    assert not any(s.startswith("mrl") for s in candidate_specs(384))


def test_the_pick_fits_the_budget_and_is_the_best_that_does(cranfield: np.ndarray, tmp_path: Path) -> None:
    result = plan(cranfield, 192, specs=SPECS, collection_size=10_000, progress=False)
    quality = {r.spec: r.quality for r in result.rows}
    assert result.recommended is not None and result.recommended.stored_bytes_per_vector <= 192
    assert result.recommended.quality == max(r.quality for r in result.rows if r.fits)
    # the proxy orders the obvious cases: more bytes of the same family, more quality
    assert quality["fp16"] > 0.99 and quality["int8"] > quality["pca192+int8"] > quality["pca96+int8"] \
        > quality["pca48+int8"]
    assert quality["binary+rescore:int8"] > quality["binary"]
    rescored = next(r for r in result.rows if r.spec == "binary+rescore:int8")
    assert (rescored.bytes_per_vector, rescored.stored_bytes_per_vector, rescored.fits) == (48, 432, False)
    assert next(r for r in result.rows if r.spec == "int8").collection_bytes == 384 * 10_000
    plot(result, tmp_path / "frontier.png", "test")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert "<- recommended" in result.table()
    nothing = plan(cranfield, 8, specs=["int8", "binary"], progress=False)
    assert nothing.recommended is None and not any(r.fits for r in nothing.rows)


def test_labelled_quality_is_ndcg_of_the_judged_rows(cranfield: np.ndarray) -> None:
    queries = cranfield[:20] + 0.01  # each "query" is near its own document
    labels = Labels(queries, [{i: 1} for i in range(20)])
    result = plan(cranfield, 400, labels=labels, specs=["int8", "pca48+int8"], progress=False)
    assert result.rows[0].metric == "ndcg@10" and result.rows[0].quality > 0.95
    assert ndcg_at_10(np.array([[5, 1, 2]]), [{1: 2, 9: 1}]) == pytest.approx(
        (2 / np.log2(3)) / (2 + 1 / np.log2(3)))


@pytest.mark.parametrize(("args", "field"), [
    ({"vectors": np.zeros((5, 8), np.float32), "budget_bytes_per_vector": 10}, "vectors"),
    ({"budget_bytes_per_vector": 0}, "budget"),
    ({"budget_bytes_per_vector": float("nan")}, "budget"),
])
def test_bad_input_names_the_field(cranfield: np.ndarray, args: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        plan(**{"vectors": cranfield, "progress": False, **args})  # type: ignore[arg-type]


def test_cli_plan_recommends_within_a_collection_budget(cranfield: np.ndarray, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import nestvec
    from nestvec.cli import main

    col = nestvec.connect(tmp_path / "data").create_collection("cran", encoder=None, dim=384, codec="int8")
    col.upsert([f"d{i}" for i in range(len(cranfield))], vectors=cranfield)
    nestvec.connect(tmp_path / "data").close()
    out = tmp_path / "plans"
    # 1,200 vectors x 100 B each: 120 KB, so the pick holds at most 100 bytes per vector
    assert main(["--data", str(tmp_path / "data"), "plan", "cran", "--budget", "120KB", "--sample", "800",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "plan-cran.json").read_text())
    assert report["sample"] == 800 and report["vectors"].startswith("decoded int8")
    assert report["budget_bytes_per_vector"] == pytest.approx(100)
    chosen = next(r for r in report["rows"] if r["spec"] == report["recommended"])
    assert chosen["stored_bytes_per_vector"] <= 100 and chosen["quality"] == max(
        r["quality"] for r in report["rows"] if r["fits"])
    assert (out / "plan-cran.png").exists() and "recommended" in capsys.readouterr().out
    assert main(["--data", str(tmp_path / "data"), "plan", "cran", "--budget", "120KB", "--sample", "800",
                 "--out", str(out), "--no-progress", "--apply"]) == 0
    applied = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert applied["codec"] == report["recommended"] and applied["vectors"] == len(cranfield)
    reopened = nestvec.connect(tmp_path / "data").get_collection("cran")
    assert reopened.info()["codec"] == report["recommended"] and reopened.count() == len(cranfield)
    nestvec.connect(tmp_path / "data").close()
    assert main(["--data", str(tmp_path / "data"), "plan", "cran", "--budget", "lots"]) != 0
    assert main(["--data", str(tmp_path / "data"), "plan", "cran", "--bytes-per-vector", "96",
                 "--queries", "q.jsonl"]) != 0
    assert "qrels" in capsys.readouterr().err
