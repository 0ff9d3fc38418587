"""Codec round trips, score error bounds, persistence and spec parsing, on real MiniLM vectors."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from nestvec.compression import Codec, code_size, make_codec
from nestvec.errors import FailedPreconditionError, InvalidArgumentError
from nestvec.index.flat import FlatIndex

SPECS = ["fp32", "fp16", "fp8", "fp8e5m2", "int8", "binary", "pca192+fp8", "mrl128+int8", "binary+rescore:fp16"]


@pytest.fixture(scope="module")
def data(scifact_vectors: tuple[list[str], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    _, vectors = scifact_vectors
    return vectors[:3000], vectors[3000:3100]


def _recall_at_10(exact: np.ndarray, approx: np.ndarray) -> float:
    top = np.argsort(-exact, axis=1)[:, :10]
    got = np.argsort(-approx, axis=1)[:, :10]
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, got, strict=True)]))


@pytest.mark.parametrize(
    ("spec", "max_error", "min_recall"),
    [("fp32", 1e-6, 1.0), ("fp16", 2e-3, 0.99), ("fp8", 0.02, 0.95), ("fp8e5m2", 0.04, 0.93), ("int8", 0.03, 0.95)],
)
def test_full_dimension_scores_stay_close_to_exact(data: tuple[np.ndarray, np.ndarray], spec: str,
                                                   max_error: float, min_recall: float) -> None:
    docs, queries = data
    codec = make_codec(spec, 384).fit(docs[:1000])
    approx = codec.scores(queries, codec.encode(docs))
    exact = queries @ docs.T
    assert np.abs(approx - exact).max() < max_error
    assert _recall_at_10(exact, approx) >= min_recall


@pytest.mark.parametrize("spec", ["fp32", "fp16", "fp8", "fp8e5m2", "int8"])
def test_decode_round_trip(data: tuple[np.ndarray, np.ndarray], spec: str) -> None:
    docs, _ = data
    codec = make_codec(spec, 384).fit(docs)
    decoded = codec.decode(codec.encode(docs))
    rel = np.linalg.norm(decoded - docs, axis=1) / np.linalg.norm(docs, axis=1)
    assert rel.max() < {"fp32": 1e-6, "fp16": 1e-3, "fp8": 0.08, "fp8e5m2": 0.15, "int8": 0.08}[spec]
    # scores through the codec equal inner products with the decoded vectors
    assert np.allclose(codec.scores(docs[:5], codec.encode(docs)), docs[:5] @ decoded.T, atol=1e-4)


def test_float8_scale_prevents_underflow(data: tuple[np.ndarray, np.ndarray]) -> None:
    docs, _ = data
    significant = np.abs(docs) > 1e-4
    unscaled = docs.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    codec = make_codec("fp8", 384).fit(docs)
    scaled = codec.decode(codec.encode(docs))
    assert np.mean(unscaled[significant] == 0) > 0.01  # the problem is real on MiniLM vectors
    assert np.mean(scaled[significant] == 0) == 0


def test_int8_scores_use_scale_and_offset(data: tuple[np.ndarray, np.ndarray]) -> None:
    docs, queries = data
    codec = make_codec("int8", 384).fit(docs)
    codes = codec.encode(docs)
    raw_bucket_scores = queries @ codes.astype(np.float32).T
    exact = queries @ docs.T
    scored = codec.scores(queries, codes)
    assert _recall_at_10(exact, scored) > _recall_at_10(exact, raw_bucket_scores)
    assert np.abs(scored - exact).max() < 0.03 < np.median(np.abs(raw_bucket_scores - exact))


def test_pca_keeps_ranking_and_offsets_scores(data: tuple[np.ndarray, np.ndarray]) -> None:
    docs, queries = data
    full = make_codec("pca384+fp32", 384).fit(docs)
    assert np.allclose(full.scores(queries, full.encode(docs)), queries @ docs.T, atol=1e-4)
    half = make_codec("pca50%+fp8", 384).fit(docs)
    assert half.spec == "pca192+fp8" and half.bytes_per_vector == 192
    assert _recall_at_10(queries @ docs.T, half.scores(queries, half.encode(docs))) > 0.8


def test_binary_is_32x_smaller_and_rescoring_recovers_ranking(data: tuple[np.ndarray, np.ndarray]) -> None:
    docs, queries = data
    codec = make_codec("binary+rescore", 384).fit(docs)
    assert codec.bytes_per_vector == 48 and codec.stored_bytes_per_vector == 48 + 1536
    index = FlatIndex(codec)
    index.append(codec.encode(docs))
    _, rows = index.search(queries, 40)
    assert codec.rescore is not None
    refined = codec.rescore.decode(codec.rescore.encode(docs))
    exact_top = np.argsort(-(queries @ docs.T), axis=1)[:, :10]
    rescored = np.einsum("qcd,qd->qc", refined[rows], queries)
    top = np.take_along_axis(rows, np.argsort(-rescored, axis=1)[:, :10], axis=1)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_top, top, strict=True)])
    assert recall > 0.9


@pytest.mark.parametrize("spec", SPECS)
def test_save_load_gives_identical_codes_and_scores(tmp_path: Path, data: tuple[np.ndarray, np.ndarray],
                                                    spec: str) -> None:
    docs, queries = data
    codec = make_codec(spec, 384).fit(docs[:500])
    codec.save(tmp_path)
    loaded = Codec.load(tmp_path)
    assert loaded.spec == codec.spec and loaded.fitted
    assert np.array_equal(loaded.encode(docs[:50]), codec.encode(docs[:50]))
    assert np.array_equal(loaded.scores(queries, codec.encode(docs[:50])), codec.scores(queries, codec.encode(docs[:50])))
    assert not list(tmp_path.glob("*.pkl"))


def test_unfitted_codec_saves_and_refuses_to_encode(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    make_codec("int8", 384).save(tmp_path)
    loaded = Codec.load(tmp_path)
    assert not loaded.fitted
    with pytest.raises(FailedPreconditionError, match="not fitted"):
        loaded.encode(data[0][:2])


def test_code_sizes() -> None:
    assert [code_size(s, 384) for s in ["fp32", "fp16", "fp8", "int8", "binary", "pca96+fp8", "mrl64+fp16"]] == [
        1536, 768, 384, 384, 48, 96, 128]


@pytest.mark.parametrize("spec", ["", "fp7", "pca+fp8", "pca999+fp8", "mrl0+fp8", "pca64+mrl32+fp8", "fp8+rescore:pca8+fp8"])
def test_bad_specs_name_the_codec_field(spec: str) -> None:
    with pytest.raises(InvalidArgumentError, match="codec") as err:
        make_codec(spec, 384)
    assert err.value.field == "codec"


def test_pca_needs_enough_vectors(data: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(FailedPreconditionError, match="at least 192"):
        make_codec("pca192+fp8", 384).fit(data[0][:10])


def test_scores_are_computed_in_blocks(data: tuple[np.ndarray, np.ndarray]) -> None:
    docs, queries = data
    codec = make_codec("fp8", 384).fit(docs)
    codes = codec.encode(docs)
    blocks = list(codec.iter_scores(queries, codes, block_rows=1000))
    assert [b.shape[1] for _, b in blocks] == [1000, 1000, 1000]
    # Same sums, but BLAS may order them differently per block width: float32 rounding, not a bug.
    np.testing.assert_allclose(np.concatenate([b for _, b in blocks], axis=1), codec.scores(queries, codes),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["fp32", "fp16", "int8", "fp8", "binary", "pca192+int8"])
def test_top_parts_returns_the_best_rows_of_the_parts(data: tuple[np.ndarray, np.ndarray], spec: str) -> None:
    """Through faiss's list scanner (fp32, fp16, int8) or numpy (the rest): the same rows and
    scores as scoring every code, masked rows never returned, and fewer rows than asked padded
    with -1. The parts are read-only views of one buffer, as posting lists read from LMDB are."""
    docs, queries = data
    codec = make_codec(spec, 384).fit(docs[:1000])
    blob = codec.encode(docs[:2000]).tobytes()
    codes = np.frombuffer(blob, dtype=np.uint8).reshape(2000, codec.bytes_per_vector)
    parts = [codes[a:b] for a, b in [(0, 150), (150, 150), (150, 151), (151, 900), (900, 2000)]]  # uneven lists
    keep = np.random.default_rng(0).random(len(codes)) < 0.7
    expected = codec.scores(queries[:3], codes)
    for mask in (None, keep):
        scores, rows = codec.top_parts(queries[:3], parts, 40, mask)
        assert scores.shape == rows.shape == (3, 40) and (rows >= 0).all()
        for q in range(3):
            allowed = expected[q] if mask is None else np.where(mask, expected[q], -np.inf)
            assert np.allclose(np.sort(scores[q])[::-1], np.sort(allowed)[::-1][:40], atol=1e-3)
            assert np.allclose(scores[q], expected[q][rows[q]], atol=1e-3)
            assert (np.diff(scores[q]) <= 0).all()  # best first: the planner ranks by this order
            assert mask is None or mask[rows[q]].all()
    few = np.zeros(len(codes), dtype=bool)
    few[[5, 1500]] = True
    scores, rows = codec.top_parts(queries[:1], parts, 10, few)
    assert sorted(rows[0][rows[0] >= 0].tolist()) == [5, 1500] and np.isinf(scores[0][rows[0] < 0]).all()
    empty_scores, empty_rows = codec.top_parts(queries[:1], [codes[:0]], 10)
    assert empty_scores.shape == empty_rows.shape == (1, 0)
    short_scores, short_rows = codec.top_parts(queries[:2], [codes[:3], codes[3:5]], 10)
    assert short_rows.shape == (2, 5) and sorted(short_rows[1].tolist()) == [0, 1, 2, 3, 4]
    assert np.allclose(short_scores[1], expected[1][short_rows[1]], atol=1e-3)


@pytest.mark.parametrize("spec", ["fp32", "fp16", "int8", "pca192+int8"])
def test_a_list_scan_keeps_the_best_ids_that_its_filter_lets_through(data: tuple[np.ndarray, np.ndarray],
                                                                     spec: str) -> None:
    """Blocks of codes with their own ids, as SPANN's posting lists: the best `wide` ids by exact
    code score; `keep` passes only ids set in it (none past its end), `drop` removes ids set in it
    (none past its end), and both together; bad blocks raise naming the field."""
    from nestvec.compression.codec import IdFilter

    docs, queries = data
    codec = make_codec(spec, 384).fit(docs[:1000])
    codes = codec.encode(docs[:1500])
    ids = np.arange(1500, dtype=np.int64) * 3 + 1  # sparse ids, as after deletes
    expected = codec.scores(queries[:1], codes)[0]
    keep = np.zeros(3000, dtype=bool)  # covers ids below 3000 only: ids past it are not kept
    keep[ids[::2][ids[::2] < 3000]] = True
    drop = np.zeros(ids.max() - 100, dtype=bool)  # ids past its end are never dropped
    drop[ids[:300]] = True
    for only, passes in [(None, np.ones(1500, bool)), (IdFilter(keep=keep), (np.arange(1500) % 2 == 0) & (ids < 3000)),
                         (IdFilter(drop=drop), np.arange(1500) >= 300),
                         (IdFilter(keep=keep, drop=drop), (np.arange(1500) % 2 == 0) & (ids < 3000) & (np.arange(1500) >= 300))]:
        scan = codec.list_scan(queries[:1], 25, only)
        assert scan is not None
        for lo, hi in [(0, 400), (400, 401), (401, 401), (401, 1500)]:
            scan.add(ids[lo:hi], codes[lo:hi])
        scores, found = scan.result()
        best = np.argsort(-np.where(passes, expected, -np.inf))[:25]
        assert sorted(found.tolist()) == sorted(ids[best].tolist())
        assert np.allclose(scores, np.sort(expected[best])[::-1], atol=1e-3)
    scan = codec.list_scan(queries[:1], 5)
    assert scan is not None
    with pytest.raises(InvalidArgumentError, match="codes"):
        scan.add(ids[:10], codes[:10, :7])
    few = codec.list_scan(queries[:1], 5)
    assert few is not None
    few.add(ids[:2], codes[:2])
    assert few.result()[1].tolist()[2:] == [-1, -1, -1]
    assert make_codec("fp8", 384).fit(docs[:1000]).list_scan(queries[:1], 5) is None  # numpy codecs have none
