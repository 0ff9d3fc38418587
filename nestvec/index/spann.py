"""SPANN-like memory-disk index: centroids in RAM, balanced posting lists of codes in LMDB.

Build: hierarchical balanced k-means into lists of <= posting_limit vectors; each vector also
goes to up to `replicas` more lists whose centroid is within (1 + eps1) of its nearest, filtered
by the RNG rule (skip list j when an already chosen centroid s is closer to c_j than x is).
Search: nearest centroids on a PCA prefix, re-ranked on the full centroid; probe list j only if
d(q, c_j) <= (1 + eps2) d(q, c_1), at most nprobe lists; score the lists' codes through the
codec; de-duplicate replicated ids; top-k.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from nestvec.compression import Codec
from nestvec.errors import invalid
from nestvec.fsutil import load_npy, read_json, save_npy, write_json
from nestvec.index.centroids import CentroidIndex, ClusteringConfig, balanced_kmeans
from nestvec.index.postings import PostingStore
from nestvec.index.topk import empty_topk

INDEX_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SpannConfig:
    posting_limit: int = 96   # [PostingVectorLimit]
    branching: int = 16
    replicas: int = 8         # [ReplicaCount] extra lists a boundary vector may join
    eps1: float = 0.10        # closure: join list j if d(x, c_j) <= (1 + eps1) d(x, c_1)
    # [RNGFactor] skip j if d(c_j, c_s) * rng_factor < d(x, c_j). At 1.0 almost nothing replicates on
    # wiki250k MiniLM vectors; 2.0 gives 2.9 entries per vector and +0.055 recall@10 at nprobe 64.
    rng_factor: float = 2.0
    prefix_dim: int = 64      # centroid search dims (AdANNS)
    nprobe: int = 64          # most lists probed per query
    eps2: float = 0.25        # query-aware pruning: probe j if d(q, c_j) <= (1 + eps2) d(q, c_1)
    # Live inserts split a list past this many entries (replicas included; 0 = 3 x posting_limit,
    # since built lists already hold ~2-3x their limit once boundary replicas are added).
    split_limit: int = 0
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"format_version": INDEX_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpannConfig:
        return cls(**{k: v for k, v in data.items() if k != "format_version"})


def assign_with_replicas(vectors: np.ndarray, centroids: CentroidIndex, config: SpannConfig) -> np.ndarray:
    """Lists of each vector (primary first), as [n, 1 + replicas] with -1 padding; vectorised over vectors."""
    dist, cand = centroids.search(vectors, 2 * (config.replicas + 1))
    dist = np.sqrt(np.maximum(dist, 0))
    chosen = np.full((len(vectors), config.replicas + 1), -1, dtype=np.int64)
    chosen[:, 0] = cand[:, 0]
    count = np.ones(len(vectors), dtype=np.int64)
    c = centroids.centroids
    for p in range(1, cand.shape[1]):
        j = cand[:, p]
        ok = (dist[:, p] <= (1 + config.eps1) * dist[:, 0]) & (count <= config.replicas)
        for s in range(config.replicas + 1):
            held = chosen[:, s]
            active = ok & (held >= 0)
            if not active.any():
                continue
            centroid_gap = np.linalg.norm(c[j[active]] - c[held[active]], axis=1)
            blocked = np.zeros(len(vectors), dtype=bool)
            blocked[active] = centroid_gap * config.rng_factor < dist[active, p]
            ok &= ~blocked
        rows = np.flatnonzero(ok)
        chosen[rows, count[rows]] = j[rows]
        count[rows] += 1
    return chosen


class SpannIndex:
    """Ids are int64 and never reused after a delete (callers give a re-inserted document a new id),
    so a tombstone set is the whole version map."""

    def __init__(self, codec: Codec, centroids: CentroidIndex, postings: PostingStore, config: SpannConfig,
                 tombstones: np.ndarray | None = None) -> None:
        self.codec, self.centroids, self.postings, self.config = codec, centroids, postings, config
        self.tombstones = np.zeros(0, dtype=np.int64) if tombstones is None else tombstones

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, codec: Codec, env: lmdb.Environment,
              config: SpannConfig = SpannConfig()) -> SpannIndex:
        """Cluster, replicate boundary vectors, write every list in one transaction."""
        if len(vectors) != len(ids):
            raise invalid("ids", f"{len(ids)} ids for {len(vectors)} vectors")
        _, raw_centroids = balanced_kmeans(vectors, ClusteringConfig(config.posting_limit, config.branching,
                                                                     seed=config.seed))
        centroids = CentroidIndex.fit(raw_centroids, config.prefix_dim)
        assigned = assign_with_replicas(vectors, centroids, config)
        codes = codec.encode(vectors)
        rows = np.repeat(np.arange(len(vectors)), assigned.shape[1])
        lists = assigned.ravel()
        keep = lists >= 0
        rows, lists = rows[keep], lists[keep]
        order = np.argsort(lists, kind="stable")
        rows, lists = rows[order], lists[order]
        bounds = np.searchsorted(lists, np.arange(len(centroids) + 1))
        postings = PostingStore(env)
        payload = {int(list_id): (ids[rows[lo:hi]], codes[rows[lo:hi]])
                   for list_id, (lo, hi) in enumerate(itertools.pairwise(bounds)) if hi > lo}
        with env.begin(write=True) as txn:
            postings.write(payload, txn)
            postings.write_centroids(txn, dict(enumerate(centroids.centroids)))
        return cls(codec, centroids, postings, config)

    # -- live updates (SPFresh-style, without background rebalancing yet) ----------------------
    def insert(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Append to each vector's lists (with replicas); a list past the split limit splits in two
        and the vectors of both halves are reassigned against the new centroids (SPFresh's LIRE,
        restricted to the split lists)."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.postings.env.begin(write=True) as txn:
            lists = self._append(txn, self._lists_of(vectors), ids, self.codec.encode(vectors), {})
            new_centroids = self._split_oversized(lists)
            if new_centroids:
                previous = self.centroids.centroids.copy()
                self.centroids.set(new_centroids)
                try:
                    self._reassign(txn, lists, sorted(new_centroids))
                except BaseException:
                    self.centroids = CentroidIndex(previous, self.centroids.rotation, self.centroids.prefix_dim)
                    raise
            self.postings.write(lists, txn)
            self.postings.write_centroids(txn, new_centroids)

    def _lists_of(self, vectors: np.ndarray) -> np.ndarray:
        return assign_with_replicas(vectors, self.centroids, self.config)

    def _append(self, txn: lmdb.Transaction, assigned: np.ndarray, ids: np.ndarray, codes: np.ndarray,
                lists: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Add (ids, codes) to their assigned lists, reading each list once; purges tombstones on the way."""
        size = self.codec.bytes_per_vector
        rows = np.repeat(np.arange(len(ids)), assigned.shape[1])
        flat = assigned.ravel()
        rows, flat = rows[flat >= 0], flat[flat >= 0]
        missing = [lid for lid in np.unique(flat).tolist() if lid not in lists]
        for lid, old_ids, old_codes in self.postings.read(txn, missing, size):
            live = ~np.isin(old_ids, self.tombstones)
            lists[lid] = (old_ids[live].copy(), old_codes[live].copy())
        for list_id in np.unique(flat).tolist():
            mine = rows[flat == list_id]
            old_ids, old_codes = lists.get(list_id, (np.zeros(0, np.int64), np.zeros((0, size), np.uint8)))
            fresh = mine[~np.isin(ids[mine], old_ids)]
            lists[list_id] = (np.concatenate([old_ids, ids[fresh]]), np.concatenate([old_codes, codes[fresh]]))
        return lists

    def _reassign(self, txn: lmdb.Transaction, lists: dict[int, tuple[np.ndarray, np.ndarray]],
                  split: list[int]) -> None:
        """Members of split lists stay only where their new assignment puts them, and join the
        other lists it names."""
        members_ids = np.concatenate([lists[lid][0] for lid in split])
        members_codes = np.concatenate([lists[lid][1] for lid in split])
        members_ids, first = np.unique(members_ids, return_index=True)
        members_codes = members_codes[first]
        assigned = self._lists_of(self.codec.reconstruct(members_codes))
        for lid in split:
            ids, codes = lists[lid]
            wanted = members_ids[(assigned == lid).any(axis=1)]
            keep = np.isin(ids, wanted)
            lists[lid] = (ids[keep], codes[keep])
        self._append(txn, assigned, members_ids, members_codes, lists)

    def _split_oversized(self, lists: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[int, np.ndarray]:
        """Balanced 2-means on each list past the split limit: it keeps one half, a new list takes the other."""
        import faiss

        updates: dict[int, np.ndarray] = {}
        next_id = len(self.centroids)
        limit = self.config.split_limit or 3 * self.config.posting_limit
        for list_id in [lid for lid, (i, _) in lists.items() if len(i) > limit]:
            ids, codes = lists[list_id]
            vectors = self.codec.reconstruct(codes)
            # Cluster the list's own members (nearest centroid is this list), not the boundary
            # replicas it holds for its neighbours: as at build time, a centroid is the mean of
            # its primaries, not pulled toward the boundaries.
            primary = self.centroids.search(vectors, 1)[1][:, 0] == list_id
            core = vectors[primary] if primary.sum() >= 4 else vectors
            kmeans = faiss.Kmeans(vectors.shape[1], 2, niter=10, seed=self.config.seed + next_id,
                                  min_points_per_centroid=1)
            kmeans.train(core)
            centres = np.asarray(kmeans.centroids)
            d = ((vectors[:, None, :] - centres[None]) ** 2).sum(axis=2)
            first, second = np.flatnonzero(d[:, 0] <= d[:, 1]), np.flatnonzero(d[:, 0] > d[:, 1])
            if not len(first) or not len(second):  # degenerate: fall back to a balanced cut
                order = np.argsort(d[:, 0] - d[:, 1], kind="stable")
                first, second = order[: len(order) // 2], order[len(order) // 2:]
            lists[list_id] = (ids[first], codes[first])
            lists[next_id] = (ids[second], codes[second])
            updates[list_id], updates[next_id] = centres[0], centres[1]
            next_id += 1
        return updates

    def delete(self, ids: np.ndarray) -> None:
        """Tombstone ids: never returned again; purged from a list when it is next rewritten."""
        ids = np.asarray(ids, dtype=np.int64)
        with self.postings.env.begin(write=True) as txn:
            self.postings.add_tombstones(txn, ids)
        self.tombstones = np.union1d(self.tombstones, ids)

    def stats(self) -> dict[str, Any]:
        with self.postings.env.begin() as txn:
            entries = sum(len(ids) for _, ids, _ in self.postings.read(txn, range(len(self.centroids)),
                                                                     self.codec.bytes_per_vector))
        return {"lists": len(self.centroids), "entries": entries}

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None,
               eps2: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) [nq, k], ids padded with -1."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise invalid("k", f"must be a positive integer, got {k!r}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.codec.dim:
            raise invalid("queries", f"expected shape (n, {self.codec.dim}), got {queries.shape}")
        if not np.isfinite(queries).all():
            raise invalid("queries", "contain NaN or inf")
        cfg = replace(self.config, nprobe=nprobe or self.config.nprobe,
                      eps2=self.config.eps2 if eps2 is None else eps2)
        dist, lists = self.centroids.search(queries, cfg.nprobe)
        dist = np.sqrt(np.maximum(dist, 0))
        probe = dist <= (1 + cfg.eps2) * dist[:, :1]
        best_scores, best_ids = empty_topk(len(queries), k)
        size = self.codec.bytes_per_vector
        with self.postings.env.begin(buffers=True) as txn:
            for qi in range(len(queries)):
                parts = self.postings.read(txn, lists[qi][probe[qi]], size)
                if not parts:
                    continue
                ids = np.concatenate([p[1] for p in parts])
                # small blocks: the float32 copy of a block stays a few MB even under a memory cap
                scores = self.codec.scores(queries[qi:qi + 1], np.concatenate([p[2] for p in parts]),
                                           block_rows=2048)[0]
                if len(self.tombstones):
                    scores = np.where(np.isin(ids, self.tombstones), -np.inf, scores).astype(np.float32)
                # A vector sits in at most 1 + replicas lists, so the best k * (1 + replicas) hold k distinct ids.
                wide = min(len(ids), k * (1 + self.config.replicas))
                top = np.argpartition(-scores, wide - 1)[:wide] if wide < len(ids) else np.arange(len(ids))
                order = top[np.lexsort((ids[top], -scores[top]))]
                _, first = np.unique(ids[order], return_index=True)  # replicas: keep each id once
                keep = order[np.sort(first)[:k]]
                keep = keep[np.isfinite(scores[keep])]
                best_scores[qi, : len(keep)] = scores[keep]
                best_ids[qi, : len(keep)] = ids[keep]
        return best_scores, best_ids

    # -- persistence ---------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """The static parts (rotation, config); centroids and tombstones live in LMDB with the lists."""
        save_npy(folder / "rotation.npy", self.centroids.rotation)
        write_json(folder / "spann.json", self.config.to_json())

    @classmethod
    def load(cls, folder: Path, codec: Codec, env: lmdb.Environment) -> SpannIndex:
        config = SpannConfig.from_json(read_json(folder / "spann.json"))
        postings = PostingStore(env)
        centroids = CentroidIndex(postings.read_centroids(codec.dim), load_npy(folder / "rotation.npy"),
                                  config.prefix_dim)
        return cls(codec, centroids, postings, config, postings.read_tombstones())
