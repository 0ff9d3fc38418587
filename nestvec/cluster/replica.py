"""One replica of one shard: an ordinary nestvec Collection on its node's disk plus its operation
log. Run as a Ray actor (nestvec.cluster.ray_backend); plain Python here, so it is testable alone.

Write protocol: an entry is appended to the log, then applied to the collection with the
sequence number saved in the same LMDB transaction as the data (the collection's checkpoint).
On open, entries logged but not applied (a crash in between) are applied again, so the replica
always reopens at a consistent, known sequence number.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nestvec.cluster.oplog import OpLog
from nestvec.cluster.ops import Op, codec_from_files
from nestvec.collection import CONFIG_FILE, Collection
from nestvec.errors import FailedPreconditionError
from nestvec.types import CollectionConfig, Hit, JSONDict, Record

REPLICATION_JOB = "replication"  # the checkpoint holding the last applied sequence number


def _one_thread_each() -> None:
    """Several replicas share a node's cores and each call is small: OpenMP / BLAS pools per
    replica oversubscribe them (and spin), so each replica computes on one thread."""
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(1)
    threadpool_limits(1)


def _rss_mb() -> float:
    """This replica process's resident memory (Linux; 0 where /proc is not there)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            line = next(line for line in fh if line.startswith("VmRSS:"))
        return round(int(line.split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        return 0.0


class ShardReplica:
    def __init__(self, folder: str, config: JSONDict) -> None:
        _one_thread_each()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        data = self.folder / "collection"
        if not (data / CONFIG_FILE).exists():
            parsed = CollectionConfig.from_json(config)
            staging = self.folder / f".creating-{uuid.uuid4().hex[:8]}"
            Collection.create(staging, parsed.name, encoder=parsed.encoder, dim=parsed.dim, codec=parsed.codec,
                              index=parsed.index).close()
            os.rename(staging, data)
        self.collection = Collection(data)
        self.collection.auto_fit = False  # the front door fits one codec for every shard
        self.log = OpLog(self.folder / "oplog")
        self._lock = threading.Lock()
        self.applied = int(self.collection.jobs().get(REPLICATION_JOB, {}).get("seq", 0))
        for seq, entry in self.log.read(self.applied):
            self._apply(seq, Op.from_bytes(entry))

    # -- writes --------------------------------------------------------------------------------
    def apply(self, entries: Sequence[tuple[int, bytes]]) -> tuple[int, list[int]]:
        """Apply entries in sequence order; ones already applied are skipped (a resend is
        harmless). Returns the last applied number and, per entry, how many ids it changed."""
        changed: list[int] = []
        with self._lock:
            for seq, entry in entries:
                if seq <= self.applied:
                    changed.append(0)
                    continue
                if seq != self.applied + 1:
                    raise FailedPreconditionError(f"replica at {self.applied} cannot apply {seq}: catch up first")
                if self.log.last() < seq:
                    self.log.append(seq, entry)
                changed.append(self._apply(seq, Op.from_bytes(entry)))
        return self.applied, changed

    def _apply(self, seq: int, op: Op) -> int:
        mark = (REPLICATION_JOB, {"seq": seq})
        col = self.collection
        if op.kind == "upsert":
            done = col.upsert(op.ids, texts=op.texts, vectors=op.vectors, metadata=op.metadata, checkpoint=mark)
        elif op.kind == "delete":
            done = col.delete(op.ids, checkpoint=mark)
        else:
            assert op.codec_files is not None
            if col.staged:  # not yet adopted (a replay after a crash may find it done)
                col.adopt_codec(codec_from_files(op.codec_files))
            col.delete([], checkpoint=mark)
            done = 0
        self.applied = seq
        return done

    def flush_index(self) -> None:
        self.collection.flush_index()

    def log_since(self, after: int, upto: int | None = None) -> list[tuple[int, bytes]]:
        return self.log.read(after, upto)

    # -- reads ---------------------------------------------------------------------------------
    def search_batch(self, queries: Any, k: int, filter: JSONDict | None, vectors: np.ndarray | None,
                     options: JSONDict) -> list[list[Hit]]:
        return self.collection.search_batch(queries, k, filter, vectors=vectors, **options)

    def get(self, ids: Sequence[str]) -> list[Record | None]:
        return self.collection.get(ids)

    def count(self) -> int:
        return self.collection.count()

    def sample(self, size: int, seed: int = 0) -> np.ndarray:
        """Float vectors of up to `size` random documents (to fit the shared codec on)."""
        if self.collection.count() == 0:
            return np.zeros((0, self.collection.config.dim), dtype=np.float32)
        return self.collection.plan_sample(min(size, self.collection.count()), seed=seed, progress=False)[1]

    def status(self) -> JSONDict:
        info = self.collection.info()
        return {"applied": self.applied, "count": info["count"], "node": socket.gethostname(), "pid": os.getpid(),
                "codec_fitted": info["codec_fitted"], "index": info["index"]["kind"], "folder": str(self.folder),
                "disk_bytes": info["disk_bytes"], "rss_mb": _rss_mb()}

    def digest(self) -> str:
        """A hash of the replica's content (ids, texts, metadata, vectors), to compare siblings."""
        col = self.collection
        ids = sorted(col.ids())
        digest = hashlib.sha256()
        for lo in range(0, len(ids), 4096):
            chunk = ids[lo:lo + 4096]
            for record in col.get(chunk):
                assert record is not None
                digest.update(repr((record.id, record.text, sorted(record.metadata.items()))).encode())
            stored = col.stored_vectors(chunk)
            digest.update(np.stack([stored[i] for i in chunk]).tobytes())
        return digest.hexdigest()

    def ping(self) -> int:
        return self.applied

    def destroy(self) -> None:
        """Drop this replica's data (the collection is being dropped)."""
        self.collection.close("dropped")
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)
