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
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from nestvec.compression import Codec
from nestvec.compression.codec import IdFilter, top_columns
from nestvec.errors import invalid
from nestvec.fsutil import read_json, write_json
from nestvec.index.centroids import CentroidIndex, ClusteringConfig, LazyRows, balanced_kmeans
from nestvec.index.postings import PostingStore
from nestvec.index.topk import empty_topk

INDEX_FORMAT_VERSION = 1
# Up to this many queries are searched one by one; larger batches read each list once for all the
# queries probing it (1,000 wiki250k queries: 0.72 s grouped against 1.7 s one by one; for a few
# queries the grouping's per-list bookkeeping costs more than it saves).
SMALL_BATCH = 16
# A build clusters at most this many vectors (a 250k collection need not hold all its float32
# vectors at once), then assigns the rest to the centroids BUILD_CHUNK at a time.
BUILD_SAMPLE = 65_536
BUILD_CHUNK = 16_384
MIN_SAMPLE_LIST = 8
INSERT_GROUP = 128  # posting lists an insert reads, changes and writes at a time
ASSIGN_CHUNK = 4096  # vectors assigned to lists at a time


@dataclass(frozen=True)
class SpannConfig:
    posting_limit: int = 192  # [PostingVectorLimit]
    branching: int = 16
    replicas: int = 4         # [ReplicaCount] extra lists a boundary vector may join
    eps1: float = 0.10        # closure: join list j if d(x, c_j) <= (1 + eps1) d(x, c_1)
    # [RNGFactor] skip j if d(c_j, c_s) * rng_factor < d(x, c_j). Swept on wiki250k (150k MiniLM,
    # int8 codes, one thread, recall@10): limit 96 / 8 replicas / 2.0 at nprobe 64: 0.958 in 3.9 ms
    # (2.7 entries per vector); limit 128 / 4 / 1.5 at 64: 0.957 in 2.5 ms (1.55 per vector);
    # limit 192 / 4 / 1.5 at 48: 0.961 in 2.0 ms (fewer, longer lists: less work per list); at
    # RNG 1.0 almost nothing replicates (0.928 at limit 128, nprobe 64).
    rng_factor: float = 1.5
    prefix_dim: int = 64      # centroid search dims (AdANNS)
    nprobe: int = 96          # most lists probed per query
    # Query-aware pruning: probe j only if d(q, c_j) <= (1 + eps2) d(q, c_1). On wiki250k, nprobe 96
    # with eps2 0.16 reads fewer lists than nprobe 48 with 0.25 at the same recall@10 (0.960 in
    # 1.4 ms against 0.961 in 1.9 ms, one run): the rule keeps the lists a query needs, not a fixed count.
    eps2: float = 0.16
    # Live inserts split a list past this many entries (replicas included; 0 = 2 x posting_limit,
    # since built lists hold up to the limit in primaries plus their share of boundary replicas).
    split_limit: int = 0
    # A list rewritten with fewer live entries than this is merged away: its members move to
    # their next-nearest lists (0 = posting_limit // 2).
    merge_limit: int = 0
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"format_version": INDEX_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpannConfig:
        return cls(**{k: v for k, v in data.items() if k != "format_version"})


def assign_with_replicas(vectors: np.ndarray, centroids: CentroidIndex, config: SpannConfig,
                         chunk_rows: int = ASSIGN_CHUNK) -> np.ndarray:
    """Lists of each vector (primary first), as [n, 1 + replicas] with -1 padding; vectorised over
    vectors, chunk_rows at a time (the RNG rule gathers [rows, d] centroid pairs: unchunked, a split
    that reassigns 50k members held ~300 MB of them at once)."""
    if len(vectors) > chunk_rows:
        return np.concatenate([_assign_chunk(vectors[lo:lo + chunk_rows], centroids, config)
                               for lo in range(0, len(vectors), chunk_rows)])
    return _assign_chunk(vectors, centroids, config)


def _assign_chunk(vectors: np.ndarray, centroids: CentroidIndex, config: SpannConfig) -> np.ndarray:
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


Lists = dict[int, tuple[np.ndarray, np.ndarray]]


def two_means(x: np.ndarray, seed: int, iterations: int = 10) -> np.ndarray:
    """Centres [2, d] of a few hundred vectors (a list split).

    Written here because faiss.Kmeans costs ~20 ms a call in set-up and threads for 2 centroids
    of 300 points; this loop is two matrix products per iteration, well under a millisecond."""
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(len(x), 2, replace=False)].astype(np.float32)
    for _ in range(iterations):
        nearer_first = ((x - centres[0]) ** 2).sum(axis=1) <= ((x - centres[1]) ** 2).sum(axis=1)
        if nearer_first.all() or not nearer_first.any():
            break
        centres = np.stack([x[nearer_first].mean(axis=0), x[~nearer_first].mean(axis=0)]).astype(np.float32)
    return centres
Apply = Callable[[], None]


def _grown(mask: np.ndarray, size: int) -> np.ndarray:
    if size <= len(mask):
        return mask
    out = np.zeros(max(size, 2 * len(mask)), dtype=bool)
    out[: len(mask)] = mask
    return out


def _lookup(mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """mask[ids], False past its end."""
    if not len(mask):
        return np.zeros(ids.shape, dtype=bool)
    inside = ids < len(mask)
    return inside & mask[np.where(inside, ids, 0)]


class SpannIndex:
    """Ids are non-negative int64 and never reused after a delete (callers give a re-inserted
    document a new id), so a tombstone set is the whole version map.

    Writers call the `stage_*` methods inside their own LMDB write transaction (the collection's,
    so documents and postings commit together) and run the returned `apply` after the commit:
    in-RAM state (centroids, tombstones) changes only once the disk has."""

    def __init__(self, codec: Codec, centroids: CentroidIndex, postings: PostingStore, config: SpannConfig,
                 tombstones: np.ndarray | None = None) -> None:
        self.codec, self.centroids, self.postings, self.config = codec, centroids, postings, config
        self._dead = np.zeros(0, dtype=bool)
        self._dead_version = 0  # bumped on every delete: the cached scan filter follows it
        self._dead_filter: tuple[int, IdFilter] | None = None
        if tombstones is not None and len(tombstones):
            self._dead = _grown(self._dead, int(tombstones.max()) + 1)
            self._dead[tombstones] = True

    @property
    def tombstones(self) -> np.ndarray:
        return np.flatnonzero(self._dead)

    def is_dead(self, ids: np.ndarray) -> np.ndarray:
        return _lookup(self._dead, ids)

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, codec: Codec, env: lmdb.Environment | PostingStore,
              config: SpannConfig = SpannConfig(), txn: lmdb.Transaction | None = None) -> SpannIndex:
        """From float vectors in RAM (tests, benchmarks); see build_from for what is done."""
        if len(vectors) != len(ids):
            raise invalid("ids", f"{len(ids)} ids for {len(vectors)} vectors")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        codes = codec.encode(vectors) if len(vectors) else np.zeros((0, codec.bytes_per_vector), np.uint8)
        return cls.build_from(ids, lambda rows: vectors[rows], lambda rows: codes[rows], codec, env, config, txn)

    @classmethod
    def build_from(cls, ids: np.ndarray, read_vectors: Callable[[np.ndarray], np.ndarray],
                   read_codes: Callable[[np.ndarray], np.ndarray], codec: Codec,
                   env: lmdb.Environment | PostingStore, config: SpannConfig = SpannConfig(),
                   txn: lmdb.Transaction | None = None, sample_size: int = BUILD_SAMPLE,
                   chunk_rows: int = BUILD_CHUNK) -> SpannIndex:
        """Cluster a sample, assign every vector (with boundary replicas) chunk by chunk, then write
        the lists one at a time in one transaction (the caller's when given; whatever the
        environment held before is replaced). `read_vectors(rows)` / `read_codes(rows)` give the
        float vectors / codes of ids[rows], so no more than a sample or a chunk of float32 vectors
        and one list of codes are in RAM at once. Inside a caller's write transaction pass a
        PostingStore opened before it: LMDB cannot open databases then."""
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        if n < 2:
            raise invalid("vectors", "an index needs at least 2 vectors")
        sample = np.arange(n)
        if n > sample_size:
            sample = np.sort(np.random.default_rng(config.seed).choice(n, sample_size, replace=False))
        # Lists as long on the whole collection as posting_limit: the sample's are shorter in proportion.
        limit = max(MIN_SAMPLE_LIST, round(config.posting_limit * len(sample) / n))
        _, raw_centroids = balanced_kmeans(LazyRows(len(sample), lambda rows: read_vectors(sample[rows])),
                                           ClusteringConfig(limit, config.branching, seed=config.seed))
        centroids = CentroidIndex.fit(raw_centroids, config.prefix_dim)
        assigned = np.concatenate([  # int32: these arrays are the build's only ones as long as the collection
            assign_with_replicas(np.ascontiguousarray(read_vectors(np.arange(lo, min(n, lo + chunk_rows))),
                                                      dtype=np.float32), centroids, config).astype(np.int32)
            for lo in range(0, n, chunk_rows)])
        rows, slot = np.nonzero(assigned >= 0)  # row-major: each vector's lists in order, primary first
        lists = assigned[rows, slot]
        del assigned, slot
        order = np.argsort(lists, kind="stable")
        rows, lists = rows[order], lists[order]
        bounds = np.searchsorted(lists, np.arange(len(centroids) + 1))
        postings = env if isinstance(env, PostingStore) else PostingStore(env)

        def write(txn: lmdb.Transaction) -> None:
            postings.clear(txn)
            for list_id, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                if hi > lo:
                    postings.write({list_id: (ids[rows[lo:hi]], read_codes(rows[lo:hi]))}, txn)
            postings.write_centroids(txn, dict(enumerate(centroids.centroids)))
            postings.write_rotation(txn, centroids.rotation)
            postings.pages.release()  # the commit maps its own pages (the freed lists): start it from few

        if txn is None:
            with postings.env.begin(write=True) as own:
                write(own)
        else:
            write(txn)
        return cls(codec, centroids, postings, config)

    # -- live updates (SPFresh's LIRE: split, reassign nearby, merge, tombstones) ---------------
    def insert(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Insert in a transaction of its own."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.postings.env.begin(write=True) as txn:
            apply = self.stage_insert(txn, self.codec.encode(vectors), ids, vectors)
        apply()

    def stage_insert(self, txn: lmdb.Transaction, codes: np.ndarray, ids: np.ndarray,
                     vectors: np.ndarray | None = None) -> Apply:
        """Append to each vector's lists (with replicas); a list past the split limit splits in two
        and the members of both halves are reassigned against the new centroids.

        The lists are rewritten INSERT_GROUP at a time: a flush of a few thousand vectors touches
        most lists of a large index, and holding them all at once made its memory grow with the
        collection (~250 MB at 150k vectors)."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = self.codec.reconstruct(codes) if vectors is None else vectors
        assigned = self._lists_of(vectors, self.centroids)
        touched = np.unique(assigned[assigned >= 0])
        centroids = self.centroids
        for lo in range(0, len(touched), INSERT_GROUP):
            group = touched[lo:lo + INSERT_GROUP]
            mine = np.where(np.isin(assigned, group), assigned, -1)
            rows = np.flatnonzero((mine >= 0).any(axis=1))
            lists = self._append(txn, mine[rows], ids[rows], codes[rows], {})
            # Only this group's own lists may merge away: a list of a later group is still named
            # by assignments made before it could retire.
            centroids = self._rebalance_lists(txn, lists, centroids, mergeable=set(group.tolist()))

        def apply() -> None:
            self.centroids = centroids

        return apply

    def _rebalance(self, txn: lmdb.Transaction, lists: Lists) -> Apply:
        """Split oversized and merge undersized lists among `lists` (already read and changed),
        write them and the centroids, and return the in-RAM swap."""
        centroids = self._rebalance_lists(txn, lists, self.centroids, mergeable=None)

        def apply() -> None:
            self.centroids = centroids

        return apply

    def _rebalance_lists(self, txn: lmdb.Transaction, lists: Lists, centroids: CentroidIndex,
                         mergeable: set[int] | None) -> CentroidIndex:
        """Write `lists` after splitting the oversized and retiring the undersized (among
        `mergeable`, None for all); returns the centroids that result, to swap in after the commit."""
        changes = self._split_oversized(lists, centroids)
        merge_limit = self.config.merge_limit or self.config.posting_limit // 2
        small = [lid for lid, (i, _) in lists.items()
                 if (mergeable is None or lid in mergeable) and len(i) < merge_limit and lid not in changes
                 and centroids.live_count > 1]
        for lid in small:
            changes[lid] = None
        updated = centroids.updated(changes) if changes else centroids
        if changes:
            moved = [lid for lid in changes if lid in lists]
            self._reassign(txn, lists, moved, updated)
            for lid in small:
                lists.pop(lid, None)
        self.postings.write({lid: lists[lid] for lid in lists if lid not in small}, txn)
        self.postings.write_centroids(txn, changes)
        return updated

    def _lists_of(self, vectors: np.ndarray, centroids: CentroidIndex) -> np.ndarray:
        return assign_with_replicas(vectors, centroids, self.config)

    def _append(self, txn: lmdb.Transaction, assigned: np.ndarray, ids: np.ndarray, codes: np.ndarray,
                lists: Lists) -> Lists:
        """Add (ids, codes) to their assigned lists, reading each list once; purges tombstones on the way."""
        size = self.codec.bytes_per_vector
        rows = np.repeat(np.arange(len(ids)), assigned.shape[1])
        flat = assigned.ravel()
        rows, flat = rows[flat >= 0], flat[flat >= 0]
        self._read_into(txn, [lid for lid in np.unique(flat).tolist() if lid not in lists], lists)
        for list_id in np.unique(flat).tolist():
            mine = rows[flat == list_id]
            old_ids, old_codes = lists.get(list_id, (np.zeros(0, np.int64), np.zeros((0, size), np.uint8)))
            fresh = mine[~np.isin(ids[mine], old_ids)]
            lists[list_id] = (np.concatenate([old_ids, ids[fresh]]), np.concatenate([old_codes, codes[fresh]]))
        return lists

    def _read_into(self, txn: lmdb.Transaction, list_ids: list[int], lists: Lists) -> None:
        """Copy lists out of the map (they are about to be rewritten), without their tombstoned ids."""
        for lid, old_ids, old_codes in self.postings.read(txn, list_ids, self.codec.bytes_per_vector):
            live = ~self.is_dead(old_ids)
            lists[lid] = (old_ids[live], old_codes[live])  # boolean indexing copies out of the map

    def _reassign(self, txn: lmdb.Transaction, lists: Lists, moved: list[int], centroids: CentroidIndex) -> None:
        """Members of split or retired lists stay only where their new assignment puts them, and
        join the other lists it names."""
        members_ids = np.concatenate([lists[lid][0] for lid in moved])
        members_codes = np.concatenate([lists[lid][1] for lid in moved])
        members_ids, first = np.unique(members_ids, return_index=True)
        members_codes = members_codes[first]
        if not len(members_ids):
            return
        assigned = self._lists_of(self.codec.reconstruct(members_codes), centroids)
        for lid in moved:
            ids, codes = lists[lid]
            wanted = members_ids[(assigned == lid).any(axis=1)]
            keep = np.isin(ids, wanted)
            lists[lid] = (ids[keep], codes[keep])
        held = np.isin(assigned, np.fromiter(lists, dtype=np.int64, count=len(lists)))
        self._append(txn, np.where(held, assigned, -1), members_ids, members_codes, lists)
        # Neighbours outside `lists` take their new members now, INSERT_GROUP at a time, and are
        # not held: they were most of the memory of a large flush (~950 lists at 150k vectors).
        elsewhere = np.where(held, -1, assigned)
        targets = np.unique(elsewhere[elsewhere >= 0])
        for lo in range(0, len(targets), INSERT_GROUP):
            part = np.where(np.isin(elsewhere, targets[lo:lo + INSERT_GROUP]), elsewhere, -1)
            rows = np.flatnonzero((part >= 0).any(axis=1))
            self.postings.write(self._append(txn, part[rows], members_ids[rows], members_codes[rows], {}), txn)

    def _split_oversized(self, lists: Lists, centroids: CentroidIndex) -> dict[int, np.ndarray | None]:
        """2-means on each list past the split limit: it keeps one half, a new list takes the other."""
        updates: dict[int, np.ndarray | None] = {}
        free = centroids.free_ids()
        next_id = len(centroids)
        limit = self.config.split_limit or 2 * self.config.posting_limit
        for list_id in [lid for lid, (i, _) in lists.items() if len(i) > limit]:
            ids, codes = lists[list_id]
            vectors = self.codec.reconstruct(codes)
            # Cluster the list's own members (nearest centroid is this list), not the boundary
            # replicas it holds for its neighbours: as at build time, a centroid is the mean of
            # its primaries, not pulled toward the boundaries.
            primary = centroids.search(vectors, 1)[1][:, 0] == list_id
            core = vectors[primary] if primary.sum() >= 4 else vectors
            new_id = free.pop(0) if free else next_id
            next_id += 0 if new_id < next_id else 1
            centres = two_means(core, seed=self.config.seed + new_id)
            d = ((vectors[:, None, :] - centres[None]) ** 2).sum(axis=2)
            first, second = np.flatnonzero(d[:, 0] <= d[:, 1]), np.flatnonzero(d[:, 0] > d[:, 1])
            if not len(first) or not len(second):  # degenerate: fall back to a balanced cut
                order = np.argsort(d[:, 0] - d[:, 1], kind="stable")
                first, second = order[: len(order) // 2], order[len(order) // 2:]
            lists[list_id] = (ids[first], codes[first])
            lists[new_id] = (ids[second], codes[second])
            updates[list_id], updates[new_id] = centres[0], centres[1]
        return updates

    def delete(self, ids: np.ndarray) -> None:
        """Delete in a transaction of its own."""
        with self.postings.env.begin(write=True) as txn:
            apply = self.stage_delete(txn, ids)
        apply()

    def stage_delete(self, txn: lmdb.Transaction, ids: np.ndarray) -> Apply:
        """Tombstone ids: never returned again; purged from a list when it is next rewritten."""
        ids = np.asarray(ids, dtype=np.int64)
        self.postings.add_tombstones(txn, ids)

        def apply() -> None:
            if len(ids):
                self._dead = _grown(self._dead, int(ids.max()) + 1)
                self._dead[ids] = True
                self._dead_version += 1

        return apply

    def stage_purge(self, txn: lmdb.Transaction) -> Apply:
        """Rewrite every list that holds tombstones (SPFresh's garbage collection) and merge the
        lists it leaves too small. Tombstones stay: an id is never reused, and a stale replica
        could still sit in a list no purge has rewritten yet."""
        size = self.codec.bytes_per_vector
        touched: Lists = {}
        for lid, ids, _ in self.postings.read(txn, np.flatnonzero(self.centroids.active).tolist(), size):
            if self.is_dead(ids).any():
                touched[lid] = (np.zeros(0, np.int64), np.zeros((0, size), np.uint8))
        self._read_into(txn, list(touched), touched)
        return self._rebalance(txn, touched)

    def stats(self) -> dict[str, Any]:
        live_lists = np.flatnonzero(self.centroids.active).tolist()
        with self.postings.env.begin() as txn:
            sizes = [len(ids) for _, ids, _ in self.postings.read(txn, live_lists, self.codec.bytes_per_vector)]
        return {"lists": len(live_lists), "entries": int(sum(sizes)),
                "mean_list": float(np.mean(sizes)) if sizes else 0.0, "tombstones": int(self._dead.sum())}

    # -- search ---------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None, eps2: float | None = None,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) [nq, k], ids padded with -1. `allowed` masks ids (False past its end).

        One query reads its lists together (prefetched) and scores them in one call; a batch reads
        each list once and scores it against every query that probes it."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise invalid("k", f"must be a positive integer, got {k!r}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.codec.dim:
            raise invalid("queries", f"expected shape (n, {self.codec.dim}), got {queries.shape}")
        if not np.isfinite(queries).all():
            raise invalid("queries", "contain NaN or inf")
        if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int | np.integer)
                                   or nprobe < 1):
            raise invalid("nprobe", f"must be a positive integer, got {nprobe!r}")
        # Asking for more lists than the default also loosens the pruning in proportion, so a
        # larger nprobe keeps buying recall instead of stopping at the pruning bound.
        wider = max(1.0, (nprobe or self.config.nprobe) / self.config.nprobe)
        cfg = replace(self.config, nprobe=nprobe or self.config.nprobe,
                      eps2=self.config.eps2 * wider if eps2 is None else eps2)
        best_scores, best_ids = empty_topk(len(queries), k)
        if not self.centroids.live_count:
            return best_scores, best_ids
        dist, lists = self.centroids.search(queries, cfg.nprobe)
        dist = np.sqrt(np.maximum(dist, 0))
        probe = dist <= (1 + cfg.eps2) * dist[:, :1]
        size = self.codec.bytes_per_vector
        # A vector sits in at most 1 + replicas lists, so the best k * (1 + replicas) hold k distinct ids.
        wide = k * (1 + self.config.replicas)
        with self.postings.env.begin(buffers=True) as txn:
            if len(queries) <= SMALL_BATCH:  # grouping by list pays only when many queries share lists
                only = self._id_filter(allowed)
                for qi in range(len(queries)):
                    parts = self.postings.read(txn, lists[qi][probe[qi]], size)
                    if not parts:
                        continue
                    scan = self.codec.list_scan(queries[qi:qi + 1], wide, only)
                    if scan is None:  # codes faiss cannot read: numpy over the lists
                        ids = np.concatenate([p[1] for p in parts])
                        scores, at = self.codec.top_parts(queries[qi:qi + 1], [p[2] for p in parts], wide,
                                                          self._allowed(ids, allowed))
                        found = at[0] >= 0
                        self._take_distinct(qi, ids[at[0][found]], scores[0][found], best_scores, best_ids)
                        continue
                    for _, ids, codes in parts:
                        scan.add(ids, codes)
                    scores, ids = scan.result()
                    found = ids >= 0
                    self._take_distinct(qi, ids[found], scores[found], best_scores, best_ids)
                return best_scores, best_ids
            candidates: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(len(queries))]
            q_of, list_of = np.nonzero(probe)
            list_of = lists[q_of, list_of]
            order = np.argsort(list_of, kind="stable")
            q_of, list_of = q_of[order], list_of[order]
            unique, starts = np.unique(list_of, return_index=True)
            ends = np.append(starts[1:], len(list_of))
            for lo in range(0, len(unique), 256):  # prefetch a group of lists, then score each once
                for list_id, ids, codes in self.postings.read(txn, unique[lo:lo + 256], size):
                    slot = int(np.searchsorted(unique, list_id))
                    who = q_of[starts[slot]:ends[slot]]
                    found = self._widest(ids, self.codec.scores_parts(queries[who], [codes]), wide, allowed)
                    for qi, pair in zip(who.tolist(), found, strict=True):
                        candidates[qi].append(pair)
            for qi, pairs in enumerate(candidates):
                if pairs:
                    self._take_distinct(qi, np.concatenate([f[0] for f in pairs]),
                                        np.concatenate([f[1] for f in pairs]), best_scores, best_ids)
        return best_scores, best_ids

    def _widest(self, ids: np.ndarray, scores: np.ndarray, wide: int,
                allowed: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query row: the best `wide` (ids, scores) among live, allowed candidates."""
        keep = self._allowed(ids, allowed)
        if keep is not None:
            scores[:, ~keep] = -np.inf
        scores, top = top_columns(scores, np.broadcast_to(np.arange(len(ids)), scores.shape), wide)
        return [(ids[row_top[row_top >= 0]], row_scores[row_top >= 0])
                for row_top, row_scores in zip(top, scores, strict=True)]

    def _id_filter(self, allowed: np.ndarray | None) -> IdFilter | None:
        """The ids a list scan may return: live and allowed. The tombstones' own filter is kept
        until the next delete (packing 100k bits per query would cost more than the scan saves)."""
        if allowed is not None:
            return IdFilter(keep=allowed, drop=self._dead)
        if not len(self._dead):
            return None
        cached = self._dead_filter
        if cached is None or cached[0] != self._dead_version:
            cached = self._dead_filter = (self._dead_version, IdFilter(drop=self._dead))
        return cached[1]

    def _allowed(self, ids: np.ndarray, allowed: np.ndarray | None) -> np.ndarray | None:
        """Mask of candidates that may be returned (live, and passing the filter); None for all."""
        keep = ~self.is_dead(ids) if len(self._dead) else None
        if allowed is not None:
            keep = _lookup(allowed, ids) if keep is None else keep & _lookup(allowed, ids)
        return keep

    @staticmethod
    def _take_distinct(qi: int, ids: np.ndarray, scores: np.ndarray, best_scores: np.ndarray,
                       best_ids: np.ndarray) -> None:
        """Top k distinct ids of one query's candidates into row qi (replicas appear more than once)."""
        k = best_ids.shape[1]
        order = np.lexsort((ids, -scores))
        _, first = np.unique(ids[order], return_index=True)
        keep = order[np.sort(first)[:k]]
        best_scores[qi, : len(keep)] = scores[keep]
        best_ids[qi, : len(keep)] = ids[keep]

    # -- persistence ---------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """The parameters, as JSON; centroids, rotation and tombstones live in LMDB with the lists."""
        self.save_config(self.config, folder)

    @staticmethod
    def save_config(config: SpannConfig, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "spann.json", config.to_json())

    @classmethod
    def load(cls, folder: Path, codec: Codec, env: lmdb.Environment | PostingStore) -> SpannIndex:
        config = SpannConfig.from_json(read_json(folder / "spann.json"))
        postings = env if isinstance(env, PostingStore) else PostingStore(env)
        centroids = CentroidIndex(postings.read_centroids(codec.dim), postings.read_rotation(codec.dim),
                                  config.prefix_dim)
        return cls(codec, centroids, postings, config, postings.read_tombstones())
