"""SPANN-like index on a real slice of wiki250k: build, replicas, pruning, search, reopen, bad input."""

from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np
import pytest

from nestvec.compression import make_codec
from nestvec.errors import InvalidArgumentError
from nestvec.index.centroids import ClusteringConfig, balanced_kmeans
from nestvec.index.spann import SpannConfig, SpannIndex, assign_with_replicas
from realdata import DATA

N = 20_000


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base = np.load(DATA / "wiki250k" / "minilm_base150k_fp16.npy", mmap_mode="r")[:N].astype(np.float32)
    queries = np.load(DATA / "wiki250k" / "minilm_queries_fp16.npy")[:200].astype(np.float32)
    exact = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    return base, queries, exact


@pytest.fixture(scope="module")
def built(data: tuple[np.ndarray, np.ndarray, np.ndarray],
          tmp_path_factory: pytest.TempPathFactory) -> tuple[SpannIndex, Path]:
    base, _, _ = data
    folder = tmp_path_factory.mktemp("spann")
    env = lmdb.open(str(folder / "postings.lmdb"), map_size=1 << 30, max_dbs=8, readahead=False)
    codec = make_codec("int8", 384).fit(base[:4096])
    index = SpannIndex.build(base, np.arange(N) * 10 + 7, codec, env, SpannConfig(posting_limit=64))
    index.save(folder)
    return index, folder


def _recall(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len({(i - 7) // 10 for i in row} & set(truth)) / 10 for row, truth in zip(ids, exact, strict=True)]))


def test_balanced_kmeans_respects_the_posting_limit(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    labels, centroids = balanced_kmeans(data[0][:5000], ClusteringConfig(posting_limit=50))
    sizes = np.bincount(labels)
    assert sizes.max() <= 50 and sizes.sum() == 5000 and len(centroids) == len(sizes) >= 100


def test_replicas_follow_closure_and_rng_rules(built: tuple[SpannIndex, Path],
                                               data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    index, _ = built
    base = data[0][:2000]
    assigned = assign_with_replicas(base, index.centroids, index.config)
    count = (assigned >= 0).sum(axis=1)
    assert count.min() >= 1 and count.max() <= 1 + index.config.replicas and count.mean() > 1.2
    # the first list is the nearest centroid; replicas are within (1 + eps1) of it
    c = index.centroids.centroids
    d_first = np.linalg.norm(base - c[assigned[:, 0]], axis=1)
    nearest = np.min(np.linalg.norm(base[:, None, :] - c[None, :, :], axis=2), axis=1)
    assert np.allclose(d_first, nearest, atol=1e-4)
    for p in range(1, assigned.shape[1]):
        rows = assigned[:, p] >= 0
        d_rep = np.linalg.norm(base[rows] - c[assigned[rows, p]], axis=1)
        assert np.all(d_rep <= (1 + index.config.eps1) * d_first[rows] + 1e-5)
    # stricter RNG keeps fewer replicas
    strict = assign_with_replicas(base, index.centroids, SpannConfig(rng_factor=1.0))
    assert (strict >= 0).sum() < (assigned >= 0).sum()
    assert index.stats()["entries"] > N


def test_search_recall_and_pruning(built: tuple[SpannIndex, Path],
                                   data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    index, _ = built
    _, queries, exact = data
    _, ids = index.search(queries, 10, nprobe=32)
    _, wider = index.search(queries, 10, nprobe=192)  # past the default: pruning loosens too
    assert 0.85 <= _recall(ids, exact) < _recall(wider, exact)
    assert _recall(wider, exact) >= 0.95
    assert len({tuple(sorted(row)) for row in ids}) > 150 and all(len(set(row)) == 10 for row in ids)  # no duplicates
    _, narrow = index.search(queries, 10, nprobe=32, eps2=0.0)  # prune to the nearest list only
    assert _recall(narrow, exact) < _recall(ids, exact)
    scores, _ = index.search(queries[:5], 10, nprobe=32)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_reopen_gives_the_same_results(built: tuple[SpannIndex, Path],
                                       data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    index, folder = built
    reopened = SpannIndex.load(folder, index.codec, index.postings.env)
    a = index.search(data[1][:50], 10)
    b = reopened.search(data[1][:50], 10)
    assert np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0])


@pytest.mark.parametrize(("queries", "k", "field"), [
    (np.ones((1, 383)), 10, "queries"), (np.full((1, 384), np.nan), 10, "queries"),
    (np.ones((1, 384)), 0, "k"), (np.ones((1, 384)), -3, "k"),
])
def test_bad_input(built: tuple[SpannIndex, Path], queries: np.ndarray, k: int, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        built[0].search(queries, k)
    assert err.value.field == field


def test_live_inserts_and_deletes_match_a_fresh_build(data: tuple[np.ndarray, np.ndarray, np.ndarray],
                                                      tmp_path: Path) -> None:
    base, queries, _ = data
    rng = np.random.default_rng(1)
    ids = np.arange(N) * 10 + 7
    codec = make_codec("int8", 384).fit(base[:4096])
    config = SpannConfig(posting_limit=64, split_limit=72)  # low, so the live inserts split lists
    env = lmdb.open(str(tmp_path / "live.lmdb"), map_size=1 << 30, max_dbs=8, readahead=False)
    live = SpannIndex.build(base[:16_000], ids[:16_000], codec, env, config)
    lists_before = len(live.centroids)
    for lo in range(16_000, N, 500):  # live inserts in batches
        live.insert(base[lo:lo + 500], ids[lo:lo + 500])
    assert len(live.centroids) > lists_before  # lists over 2x the limit were split
    deleted = rng.choice(ids, 2_000, replace=False)
    live.delete(deleted[:1000])
    live.insert(base[:10], ids[:10] + 1)  # inserts after deletes purge tombstones from rewritten lists
    live.delete(deleted[1000:])
    keep = ~np.isin(ids, deleted)
    final_vectors, final_ids = np.concatenate([base[keep], base[:10]]), np.concatenate([ids[keep], ids[:10] + 1])
    exact = final_ids[np.argsort(-(queries @ final_vectors.T), axis=1)[:, :10]]

    def recall(found: np.ndarray) -> float:
        return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found.tolist(), exact.tolist(), strict=True)]))

    _, got = live.search(queries, 10, nprobe=64)
    assert not np.isin(got, deleted).any()
    fresh_env = lmdb.open(str(tmp_path / "fresh.lmdb"), map_size=1 << 30, max_dbs=8, readahead=False)
    fresh = SpannIndex.build(final_vectors, final_ids, codec, fresh_env, config)
    _, expected = fresh.search(queries, 10, nprobe=64)
    assert recall(got) >= recall(expected) - 0.01  # live updates keep the quality of a fresh build
    live.save(tmp_path)
    reopened = SpannIndex.load(tmp_path, codec, env)  # centroids and tombstones come back from LMDB
    assert len(reopened.centroids) == len(live.centroids) and len(reopened.tombstones) == 2000
    assert np.array_equal(reopened.search(queries, 10, nprobe=64)[1], got)


def test_purge_merges_emptied_lists_and_never_returns_deleted_ids(
        data: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    base, queries, _ = data
    base, ids = base[:8000], np.arange(8000)
    codec = make_codec("int8", 384).fit(base[:4096])
    env = lmdb.open(str(tmp_path / "m.lmdb"), map_size=1 << 30, max_dbs=8, readahead=False)
    index = SpannIndex.build(base, ids, codec, env, SpannConfig(posting_limit=64))
    lists_before = index.centroids.live_count
    # delete most members of the lists nearest to the first queries: those lists fall under the merge limit
    _, near = index.centroids.search(queries[:20], 3)
    primary = index.centroids.search(base, 1)[1][:, 0]
    doomed = ids[np.isin(primary, near.ravel())]
    doomed = doomed[np.random.default_rng(0).random(len(doomed)) < 0.8]
    index.delete(doomed)
    with env.begin(write=True) as txn:
        apply = index.stage_purge(txn)
    apply()
    assert index.centroids.live_count < lists_before  # emptied lists were merged away
    stats = index.stats()
    assert stats["lists"] == index.centroids.live_count
    keep = ~np.isin(ids, doomed)
    exact = ids[keep][np.argsort(-(queries @ base[keep].T), axis=1)[:, :10]]
    _, found = index.search(queries, 10, nprobe=192)
    assert not np.isin(found, doomed).any()
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found.tolist(), exact.tolist(), strict=True)])
    assert recall >= 0.9
    index.save(tmp_path)
    reopened = SpannIndex.load(tmp_path, codec, env)  # retired lists stay retired
    assert reopened.centroids.live_count == index.centroids.live_count
    assert np.array_equal(reopened.search(queries, 10, nprobe=192)[1], found)


def test_centroid_prefix_search_agrees_with_the_full_scan(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Many lists and a short probe: the prefix pass plus the re-rank is used, and finds what a
    full scan finds; a probe over a large share of the lists takes the full scan."""
    from nestvec.index.centroids import CentroidIndex

    base, queries, _ = data
    _, centroids = balanced_kmeans(base, ClusteringConfig(posting_limit=16))
    index = CentroidIndex.fit(centroids, prefix_dim=64)
    assert index.prefix_pays(8) and not index.prefix_pays(len(centroids) // 4)
    dist, lists = index.search(queries[:50], 8)
    _, full_lists = index._search_full(queries[:50], 8)
    assert np.mean([len(set(a) & set(b)) / 8 for a, b in zip(lists, full_lists, strict=True)]) >= 0.9
    assert np.mean(lists[:, 0] == full_lists[:, 0]) >= 0.95
    true = ((queries[:50, None, :] - centroids[lists]) ** 2).sum(axis=2)  # re-ranked on all dims: exact
    assert np.allclose(dist, true, atol=1e-4) and (np.diff(dist, axis=1) >= 0).all()


def test_a_build_from_a_sample_reads_bounded_chunks_and_keeps_recall(
        data: tuple[np.ndarray, np.ndarray, np.ndarray], built: tuple[SpannIndex, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Clustering a quarter of the vectors (read a chunk or a training subsample at a time, never
    the whole sample) and assigning the rest in chunks: lists as long as a full build's, recall
    within 0.02 of it."""
    from nestvec.index import centroids

    monkeypatch.setattr(centroids, "CLUSTER_CHUNK", 1000)
    monkeypatch.setattr(centroids, "TRAIN_PER_CENTROID", 64)  # 16 x 64 = 1,024 of the 5,000 sampled
    base, queries, exact = data
    full, _ = built
    codec = full.codec
    codes = codec.encode(base)
    asked: list[int] = []

    def read_vectors(rows: np.ndarray) -> np.ndarray:
        asked.append(len(rows))
        return base[rows]

    env = lmdb.open(str(tmp_path / "sampled.lmdb"), map_size=1 << 30, max_dbs=8, readahead=False)
    sampled = SpannIndex.build_from(np.arange(N) * 10 + 7, read_vectors, lambda rows: codes[rows], codec, env,
                                    SpannConfig(posting_limit=64), sample_size=N // 4, chunk_rows=3000)
    assignment = [2000, *[3000] * 6]  # all N vectors, chunk_rows at a time
    assert sorted(asked)[-len(assignment):] == assignment and max(asked[:-len(assignment)]) <= 1024
    assert abs(sampled.stats()["lists"] - full.stats()["lists"]) <= 0.2 * full.stats()["lists"]
    recall, full_recall = _recall(sampled.search(queries, 10)[1], exact), _recall(full.search(queries, 10)[1], exact)
    assert recall >= full_recall - 0.02, (recall, full_recall)
    env.close()


def test_each_delete_reaches_single_query_scans_at_once(data: tuple[np.ndarray, np.ndarray, np.ndarray],
                                                        tmp_path: Path) -> None:
    """Single queries scan with a tombstone filter that is kept between deletes: every delete must
    show in the very next search, alone and under a metadata-style allowed mask."""
    base, queries, _ = data
    env = lmdb.open(str(tmp_path / "p.lmdb"), map_size=1 << 28, max_dbs=8)
    codec = make_codec("int8", 384).fit(base[:2000])
    index = SpannIndex.build(base[:3000], np.arange(3000), codec, env, SpannConfig(posting_limit=64))
    allowed = np.arange(3000) % 3 != 0
    for _ in range(3):
        _, top = index.search(queries[:1], 10)
        _, top_allowed = index.search(queries[:1], 10, allowed=allowed)
        assert allowed[top_allowed[0][top_allowed[0] >= 0]].all()
        gone = np.unique(np.concatenate([top[0][:4], top_allowed[0][:4]]))
        index.delete(gone)
        _, after = index.search(queries[:1], 10)
        _, after_allowed = index.search(queries[:1], 10, allowed=allowed)
        assert not np.isin(after, gone).any() and not np.isin(after_allowed, gone).any()
        assert (after[0] >= 0).all() and (after_allowed[0] >= 0).all()
