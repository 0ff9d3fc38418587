"""The front door of a sharded, replicated collection: the same calls as a local Collection.

- An id's shard is a stable hash of it (ops.shard_of). The front door encodes texts once, and
  sends each shard its part as one log entry with the shard's next sequence number, to every
  live replica at once; the write is acknowledged when all of them have committed it, and a
  replica that fails is marked down (the others carry on).
- A search embeds the queries once and asks one live replica of every shard in parallel (the
  next one in turn), then merges the shards' top-k by score, ties broken by id. A replica that
  fails mid-search is marked down and its shard asked again on a sibling.
- A down replica is watched: once Ray has restarted it (it reopens its data from disk), it
  replays the entries it missed from a live sibling's log, under the shard's write lock, and
  only then serves again.
- One codec for every shard, fitted here once on a sample drawn across shards and shipped to
  the replicas as a log entry, so scores compare across shards.

Dense scores are the same in every shard, so merged dense results equal an unsharded search.
Lexical and hybrid scores are normalised per shard (BM25 statistics and min-max fusion are
shard-local), so their merge is close to, not equal to, an unsharded search.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nestvec.checks import check_checkpoint, check_ids, check_k, check_nprobe, check_upsert
from nestvec.cluster.ops import Op, codec_files, shard_of
from nestvec.cluster.ray_backend import RayBackend, Replica, collection_key
from nestvec.collection import CODEC_DIR, CONFIG_FILE, FIT_THRESHOLD
from nestvec.collection_base import EncodedCollection
from nestvec.compression import Codec
from nestvec.encoders import Encoder
from nestvec.errors import NestvecError, UnavailableError, invalid
from nestvec.fsutil import read_json, write_json
from nestvec.index.fusion import DEFAULT_ALPHA, DEFAULT_FUSION, DEFAULT_MODE, DEFAULT_RRF_K, check_fusion
from nestvec.types import CollectionConfig, Hit, Hits, JSONDict, Record, UpsertBatch

log = logging.getLogger(__name__)

CLUSTER_FILE = "cluster.json"
JOBS_FILE = "jobs.json"
FIT_SAMPLE = 8192        # vectors the shared codec is fitted on, drawn evenly across shards
CALL_TIMEOUT_S = 60.0    # a replica that has not answered by then is taken for dead
HEAL_INTERVAL_S = 0.5    # how often down replicas are checked for a restart
MAX_SHARDS, MAX_REPLICAS = 1024, 16


@dataclass(frozen=True)
class ClusterConfig:
    """Saved as cluster.json beside the collection's config."""

    shards: int
    replicas: int
    root: str  # replica folders go under this path, on the disk of whichever node holds them

    def to_json(self) -> JSONDict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JSONDict) -> ClusterConfig:
        return cls(int(data["shards"]), int(data["replicas"]), str(data["root"]))


def check_layout(shards: Any, replicas: Any) -> tuple[int, int]:
    for name, value, top in (("shards", shards, MAX_SHARDS), ("replicas", replicas, MAX_REPLICAS)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise invalid(name, f"must be an integer between 1 and {top}, got {value!r}")
    return int(shards), int(replicas)


def _cause(err: BaseException) -> BaseException:
    """A nestvec error a replica raised, out of Ray's wrapper."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, NestvecError) else err


class DistributedCollection(EncodedCollection):
    def __init__(self, folder: Path, backend: RayBackend, *, encoder: Encoder | None = None) -> None:
        self.folder = folder
        self.config = CollectionConfig.from_json(read_json(folder / CONFIG_FILE))
        self.cluster = ClusterConfig.from_json(read_json(folder / CLUSTER_FILE))
        self.codec = Codec.load(folder / CODEC_DIR)
        self._encoder = None
        if encoder is not None:
            self._attach_encoder(encoder)
        self.backend = backend
        self._ray = backend.ray
        self._errors = self._actor_errors()
        self.replicas = backend.open_replicas(collection_key(str(folder.resolve()), self.name), self.config.to_json(),
                                              self.cluster.shards, self.cluster.replicas, self.cluster.root)
        self._locks = [threading.Lock() for _ in range(self.cluster.shards)]
        self._turn = [0] * self.cluster.shards
        self._pool = ThreadPoolExecutor(max(4, self.cluster.shards), thread_name_prefix=f"nestvec-{self.name}")
        self._closed = threading.Event()
        self.heads = [0] * self.cluster.shards
        for shard in range(self.cluster.shards):
            self.heads[shard] = self._open_shard(shard)
        self._healer = threading.Thread(target=self._heal_loop, name=f"nestvec-heal-{self.name}", daemon=True)
        self._healer.start()

    @classmethod
    def create(cls, folder: Path, config: CollectionConfig, layout: ClusterConfig, codec: Codec) -> None:
        codec.save(folder / CODEC_DIR)
        write_json(folder / CLUSTER_FILE, layout.to_json())
        write_json(folder / CONFIG_FILE, config.to_json())

    def _actor_errors(self) -> tuple[type[BaseException], ...]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

        return ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

    def close(self, reason: str = "closed") -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- replicas --------------------------------------------------------------------------------
    def _call(self, replica: Replica, method: str, *args: Any) -> Any:
        """One call to one replica; a replica that does not answer is marked down and raises."""
        try:
            return self._ray.get(getattr(replica.actor, method).remote(*args), timeout=CALL_TIMEOUT_S)
        except self._errors as err:
            if replica.live:
                log.warning("collection %r: %s is down (%s)", self.name, replica.label, type(err).__name__)
            replica.live = False
            raise
        except Exception as err:
            raise _cause(err) from None

    def _open_shard(self, shard: int) -> int:
        """The shard's head: the furthest any replica got. Replicas behind it catch up first."""
        applied = {}
        for replica in self.replicas[shard]:
            try:
                applied[replica.index] = int(self._call(replica, "ping"))
            except self._errors:
                continue
        if not applied:
            raise UnavailableError(f"collection {self.name!r}: no replica of shard {shard} started")
        head = max(applied.values())
        for replica in self.replicas[shard]:
            if replica.index in applied and applied[replica.index] < head:
                replica.live = False  # the healer brings it up to date
        return head

    def _live(self, shard: int) -> list[Replica]:
        return [r for r in self.replicas[shard] if r.live]

    def _heal_loop(self) -> None:
        while not self._closed.wait(HEAL_INTERVAL_S):
            for shard, row in enumerate(self.replicas):
                for replica in row:
                    if not replica.live and not self._closed.is_set():
                        try:
                            self._catch_up(shard, replica)
                        except Exception as err:  # not up yet, or its sibling went down meanwhile
                            log.debug("collection %r: %s not back yet: %s", self.name, replica.label, err)

    def _catch_up(self, shard: int, replica: Replica) -> None:
        """Replay what a restarted replica missed from a live sibling's log, then serve again."""
        applied = int(self._ray.get(replica.actor.ping.remote(), timeout=2.0))
        while True:
            with self._locks[shard]:
                head, sources = self.heads[shard], self._live(shard)
                if applied >= head:
                    if applied > head:  # it holds writes no live replica has: they catch up from it
                        self.heads[shard] = applied
                        for sibling in sources:
                            sibling.live = False
                    replica.live = True
                    log.info("collection %r: %s is back at %d", self.name, replica.label, applied)
                    return
                if not sources:
                    raise UnavailableError(f"shard {shard}: no live replica to catch up from")
                entries = self._call(sources[0], "log_since", applied, head)
                applied, _ = self._ray.get(replica.actor.apply.remote(entries), timeout=CALL_TIMEOUT_S)
                if applied >= head:
                    replica.live = True
                    log.info("collection %r: %s caught up to %d", self.name, replica.label, applied)
                    return
            # more to replay than one batch carried: release the lock so writes go on meanwhile

    def _write(self, shard: int, op: Op) -> int:
        """One log entry to every live replica of a shard; acknowledged once they all committed."""
        entry = op.to_bytes()
        with self._locks[shard]:
            live = self._live(shard)
            if not live:
                raise UnavailableError(f"collection {self.name!r}: shard {shard} has no live replica")
            seq = self.heads[shard] + 1
            refs = [(r, r.actor.apply.remote([(seq, entry)])) for r in live]
            changed: int | None = None
            for replica, ref in refs:
                try:
                    _, counts = self._ray.get(ref, timeout=CALL_TIMEOUT_S)
                    changed = counts[0] if changed is None else changed
                except self._errors as err:
                    log.warning("collection %r: %s missed write %d (%s)", self.name, replica.label, seq,
                                type(err).__name__)
                    replica.live = False
                except Exception as err:
                    raise _cause(err) from None
            if changed is None:
                raise UnavailableError(f"collection {self.name!r}: every replica of shard {shard} failed write {seq}")
            self.heads[shard] = seq
            return changed

    def _per_shard(self, run: Callable[[int], Any], shards: Iterable[int]) -> dict[int, Any]:
        """Writes: one thread per shard (each holds its shard's lock while its replicas commit)."""
        futures = {shard: self._pool.submit(run, shard) for shard in shards}
        return {shard: future.result() for shard, future in futures.items()}

    def _start(self, shard: int, method: str, args: tuple[Any, ...]) -> tuple[Replica, Any]:
        """Send a read to the shard's next live replica in turn."""
        live = self._live(shard)
        if not live:
            raise UnavailableError(f"collection {self.name!r}: shard {shard} has no live replica")
        self._turn[shard] += 1
        replica = live[self._turn[shard] % len(live)]
        return replica, getattr(replica.actor, method).remote(*args)

    def _read_many(self, shards: Iterable[int], method: str,
                   args_of: Callable[[int], tuple[Any, ...]]) -> dict[int, Any]:
        """The same read on one replica of each shard, all sent before any is awaited; a replica
        that fails is marked down and its shard asked again on a sibling."""
        sent = {shard: self._start(shard, method, args_of(shard)) for shard in shards}
        out: dict[int, Any] = {}
        for shard, (replica, ref) in sent.items():
            while True:
                try:
                    out[shard] = self._ray.get(ref, timeout=CALL_TIMEOUT_S)
                    break
                except self._errors as err:
                    log.warning("collection %r: %s is down (%s)", self.name, replica.label, type(err).__name__)
                    replica.live = False
                    replica, ref = self._start(shard, method, args_of(shard))
                except Exception as err:
                    raise _cause(err) from None
        return out

    def _read(self, shard: int, method: str, *args: Any) -> Any:
        return self._read_many([shard], method, lambda _: args)[shard]

    # -- writes ------------------------------------------------------------------------------------
    def upsert(self, ids: Sequence[str | int], texts: Sequence[str | None] | None = None, vectors: Any = None,
               metadata: Sequence[JSONDict | None] | None = None, *,
               checkpoint: tuple[str, JSONDict] | None = None) -> int:
        """Checked and encoded here; each shard's part is one replicated write."""
        job_meta = check_checkpoint(checkpoint)
        keys, texts, given, metas = check_upsert(ids, texts, vectors, metadata, self.config.dim)
        vecs = given if given is not None else self.encoder.encode([t or "" for t in texts or []], kind="document")
        owner = shard_of(keys, self.cluster.shards)

        def write(shard: int) -> int:
            rows = np.flatnonzero(owner == shard).tolist()
            return self._write(shard, Op("upsert", [keys[r] for r in rows],
                                         None if texts is None else [texts[r] for r in rows],
                                         [metas[r] for r in rows], vecs[rows]))

        self._per_shard(write, np.unique(owner).tolist())
        if job_meta:
            self._save_job(checkpoint)
        self._maybe_fit()
        return len(keys)

    def upsert_stream(self, batches: Iterable[UpsertBatch]) -> Iterator[int]:
        for batch in batches:
            yield self.upsert(batch.ids, texts=batch.texts, vectors=batch.vectors, metadata=batch.metadata,
                              checkpoint=batch.checkpoint)

    @contextlib.contextmanager
    def bulk(self) -> Iterator[None]:
        """Each replica groups its own lexical commits; the front door has nothing to group."""
        yield

    def flush_index(self) -> None:
        """Every replica's write buffer into its index (the end of a bulk stream)."""
        self._per_shard(lambda s: [self._call(r, "flush_index") for r in self._live(s)], range(self.cluster.shards))

    def delete(self, ids: Sequence[str | int]) -> int:
        keys = check_ids(ids)
        owner = shard_of(keys, self.cluster.shards)
        done = self._per_shard(lambda s: self._write(s, Op("delete", [keys[r] for r in np.flatnonzero(owner == s)])),
                               np.unique(owner).tolist())
        return int(sum(done.values()))

    def _save_job(self, checkpoint: tuple[str, JSONDict] | None) -> None:
        assert checkpoint is not None
        jobs = self.jobs()
        jobs[checkpoint[0]] = checkpoint[1]
        write_json(self.folder / JOBS_FILE, jobs)

    def jobs(self) -> dict[str, JSONDict]:
        path = self.folder / JOBS_FILE
        return dict(read_json(path)) if path.exists() else {}

    def fit_codec(self, sample: Any) -> None:
        """Fit the shared codec now, on this sample, and install it on every shard."""
        from nestvec.checks import check_vectors

        vectors = check_vectors(sample, self.config.dim, "sample")
        if self.codec.fitted:
            raise invalid("sample", f"collection {self.name!r}'s codec is fitted already")
        self._install(vectors)

    def _maybe_fit(self) -> None:
        if self.codec.fitted or self.count() < max(self.codec.min_fit_size, FIT_THRESHOLD):
            return
        per_shard = -(-FIT_SAMPLE // self.cluster.shards)
        parts = self._read_many(range(self.cluster.shards), "sample", lambda _: (per_shard,))
        self._install(np.concatenate([parts[s] for s in sorted(parts)]))

    def _install(self, sample: np.ndarray) -> None:
        self.codec.fit(sample)
        self.codec.save(self.folder / CODEC_DIR)  # before any shard holds codes in it
        files = codec_files(self.codec)
        self._per_shard(lambda s: self._write(s, Op("codec", codec_files=files)), range(self.cluster.shards))

    # -- reads -------------------------------------------------------------------------------------
    def count(self) -> int:
        return int(sum(self._read_many(range(self.cluster.shards), "count", lambda _: ()).values()))

    def get(self, ids: Sequence[str | int]) -> list[Record | None]:
        keys = check_ids(ids)
        owner = shard_of(keys, self.cluster.shards)
        rows = {s: np.flatnonzero(owner == s).tolist() for s in np.unique(owner).tolist()}
        found = self._read_many(rows, "get", lambda s: ([keys[r] for r in rows[s]],))
        out: list[Record | None] = [None] * len(keys)
        for shard, positions in rows.items():
            for position, record in zip(positions, found[shard], strict=True):
                out[position] = record
        return out

    def search(self, query: str | Sequence[float] | np.ndarray, k: int = 10, filter: JSONDict | None = None, *,
               vector: Sequence[float] | np.ndarray | None = None, **options: Any) -> Hits:
        if not isinstance(query, str) and np.asarray(query).ndim != 1:
            raise invalid("query", "must be one text or one vector; use search_batch for several")
        rows = self.search_batch([query] if isinstance(query, str) else np.asarray(query)[None, :], k, filter,
                                 vectors=None if vector is None else np.asarray(vector)[None, :], **options)
        return Hits(rows[0], rows.missing_shards)

    def search_batch(self, queries: Sequence[str] | np.ndarray | Sequence[Sequence[float]], k: int = 10,
                     filter: JSONDict | None = None, *, vectors: Any = None, model: str | None = None,
                     rescore_candidates: int | None = None, nprobe: int | None = None, mode: str = DEFAULT_MODE,
                     fusion: str = DEFAULT_FUSION, rrf_k: int = DEFAULT_RRF_K, alpha: float = DEFAULT_ALPHA,
                     with_vectors: bool = False, allow_partial: bool = False) -> Hits[list[Hit]]:
        """Every shard's top-k, merged by score (ties by id). A shard with no live replica fails
        the search (UNAVAILABLE, naming it) unless `allow_partial`; then the result's
        `missing_shards` names it."""
        k = check_k(k)
        nprobe = check_nprobe(nprobe)
        check_fusion(mode, fusion, rrf_k, alpha)
        if not len(queries):
            raise invalid("queries", "empty batch")
        texts = isinstance(queries, Sequence) and all(isinstance(q, str) for q in queries)
        if mode != "dense" and not texts:
            raise invalid("query", f"{mode} search needs query text, not vectors")
        if vectors is not None and len(vectors) != len(queries):
            raise invalid("vectors", f"one per query: {len(queries)} queries, {len(vectors)} vectors")
        dense = self.embed_queries(queries if vectors is None else vectors, model) if mode != "lexical" else None
        sent_queries: Any = list(queries) if mode != "dense" else dense
        sent_vectors = dense if mode != "dense" else None
        options = {"rescore_candidates": rescore_candidates, "nprobe": nprobe, "mode": mode, "fusion": fusion,
                   "rrf_k": rrf_k, "alpha": alpha, "with_vectors": with_vectors}
        args = (sent_queries, k, filter, sent_vectors, options)
        live = [s for s in range(self.cluster.shards) if self._live(s)]
        missing = [s for s in range(self.cluster.shards) if s not in live]
        if missing and not allow_partial:
            raise UnavailableError(f"collection {self.name!r}: shard {missing[0]} has no live replica")
        try:
            found = self._read_many(live, "search_batch", lambda _: args)
        except UnavailableError:
            if not allow_partial:
                raise
            found = {}
            for shard in live:  # the last replica of some shard failed meanwhile: ask shard by shard
                with contextlib.suppress(UnavailableError):
                    found[shard] = self._read(shard, "search_batch", *args)
            missing = sorted(set(range(self.cluster.shards)) - set(found))
        answers = [found[s] for s in sorted(found)]
        merged = []
        for i in range(len(queries)):
            pool = [hit for answer in answers for hit in answer[i]]
            pool.sort(key=lambda h: (-h.score, h.id))
            merged.append(pool[:k])
        return Hits(merged, tuple(missing))

    # -- operations --------------------------------------------------------------------------------
    def status(self) -> list[JSONDict]:
        """Per replica: shard, node, count, last applied sequence number, health."""
        out = []
        for shard, row in enumerate(self.replicas):
            for replica in row:
                entry: JSONDict = {"shard": shard, "replica": replica.index, "live": replica.live,
                                   "head": self.heads[shard]}
                try:
                    entry.update(self._ray.get(replica.actor.status.remote(), timeout=5.0))
                except Exception as err:
                    entry["error"] = type(err).__name__
                out.append(entry)
        return out

    def info(self) -> JSONDict:
        enc = self.config.encoder
        replicas = self.status()
        counts = {r["shard"]: r["count"] for r in replicas if r.get("live") and "count" in r}
        return {"name": self.name, "count": int(sum(counts.values())), "dim": self.config.dim,
                "codec": self.codec.spec, "codec_fitted": self.codec.fitted,
                "fit_threshold": max(self.codec.min_fit_size, FIT_THRESHOLD),
                "bytes_per_vector": self.codec.bytes_per_vector,
                "stored_bytes_per_vector": self.codec.stored_bytes_per_vector,
                "compression_ratio": round(4 * self.config.dim / self.codec.bytes_per_vector, 2),
                "encoder": enc.to_json() if enc else None, "index": {"kind": "sharded", "setting": self.config.index},
                "jobs": self.jobs(),
                "cluster": {"shards": self.cluster.shards, "replicas": self.cluster.replicas, "root": self.cluster.root,
                            "members": replicas}}

    def digests(self) -> list[list[str]]:
        """Each replica's content hash, by shard (siblings of a healthy shard agree)."""
        return [[self._call(r, "digest") for r in row] for row in self.replicas]

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(r.live for row in self.replicas for r in row):
            if time.monotonic() > deadline:
                down = [r.label for row in self.replicas for r in row if not r.live]
                raise UnavailableError(f"collection {self.name!r}: {', '.join(down)} still down")
            time.sleep(0.1)

    def destroy(self) -> None:
        """Drop every replica's data and stop the actors."""
        self.close()
        for row in self.replicas:
            for replica in row:
                try:
                    self._ray.get(replica.actor.destroy.remote(), timeout=CALL_TIMEOUT_S)
                finally:
                    self.backend.kill(replica, restart=False)
