"""Bulk ingest: stream an input in batches, encode (or take precomputed vectors), and write each
batch in one transaction together with the job's checkpoint, so a killed job resumes exactly
where its last committed batch ended: no duplicates, no gaps, nothing encoded twice that landed.

The same job writes into an embedded collection or, through UpsertStream, into a server's.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from nestvec.client.base import CollectionHandle
from nestvec.encoders import Encoder
from nestvec.errors import FailedPreconditionError, invalid
from nestvec.jobs.ray_encode import RayOptions, ray_batches
from nestvec.jobs.sources import Source
from nestvec.types import JSONDict, UpsertBatch

log = logging.getLogger("nestvec.ingest")
DEFAULT_BATCH = 512
DEFAULT_FIT_SIZE = 4096


@dataclass(frozen=True)
class IngestSummary:
    documents: int          # written by this run
    resumed_from: int       # input position this run started at (0: from the start)
    seconds: float
    docs_per_second: float
    disk_bytes: int
    bytes_per_vector: int
    compression_ratio: float
    peak_rss_mb: float      # of this process, over its whole life (LMDB's mapped file pages included)
    peak_anon_mb: float     # the most anonymous memory it held while the job ran (sampled)


def peak_rss_mb() -> float:
    """Peak resident memory, file pages of LMDB's memory map included (they are page cache)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def anon_rss_mb() -> float:
    """Resident anonymous memory now: what the process itself holds, without mapped file pages."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # not Linux
        pass
    return 0.0


class AnonPeak:
    """Samples anonymous RSS in a background thread (the kernel keeps no peak of it)."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.peak_mb, self._every = anon_rss_mb(), every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nestvec-anon-peak", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.peak_mb = max(self.peak_mb, anon_rss_mb())

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, anon_rss_mb())


def ingest(collection: CollectionHandle, source: Source, *, encoder: Encoder | None = None,
           batch_size: int = DEFAULT_BATCH, fit_size: int = DEFAULT_FIT_SIZE, resume: bool = False,
           progress: bool = True, ray: RayOptions | None = None) -> IngestSummary:
    """Run (or, with `resume`, continue) the job of ingesting `source` into `collection`.

    Vectors come from the source when it has them, else from `encoder`, else (a remote
    collection) the server encodes the texts. An embedded collection whose codec is not fitted
    yet is fitted on the first `fit_size` vectors, so a resumed job codes exactly as an
    uninterrupted one. With `ray`, Ray Data reads the input and an actor pool encodes it
    (batches of `batch_size` throughout); this process still writes every batch and checkpoint."""
    if batch_size < 1:
        raise invalid("batch_size", f"must be >= 1, got {batch_size}")
    job, fingerprint = source.job_name(), source.fingerprint()
    total = source.count()  # reads the input once: a malformed line fails here, before any write
    start = _start_position(collection.jobs().get(job), fingerprint, resume, source)
    begin = time.perf_counter()
    bar = tqdm(total=total, initial=start, unit="doc", disable=not progress, desc=f"ingest {collection.name}",
               smoothing=0.1)
    written = 0
    with AnonPeak() as anon:
        for count in collection.upsert_stream(_batches(collection, source, start, total, job, fingerprint,
                                                       encoder, batch_size, fit_size, ray)):
            written += count
            bar.update(count)
    bar.close()
    seconds = time.perf_counter() - begin
    info = collection.info()
    return IngestSummary(
        documents=written, resumed_from=start, seconds=round(seconds, 2),
        docs_per_second=round(written / max(seconds, 1e-9), 1), disk_bytes=int(info["disk_bytes"]),
        bytes_per_vector=int(info["bytes_per_vector"]), compression_ratio=float(np.round(info["compression_ratio"], 2)),
        peak_rss_mb=round(peak_rss_mb(), 1), peak_anon_mb=round(anon.peak_mb, 1))


def _start_position(state: JSONDict | None, fingerprint: str, resume: bool, source: Source) -> int:
    if state is None:
        if resume:
            log.warning("no checkpoint for %s in this collection: starting from the beginning", source.path)
        return 0
    if not resume:
        if not state.get("done"):
            log.warning("an earlier run of this job stopped after %s documents; starting over "
                        "(pass --resume to continue from there)", state.get("position"))
        return 0
    if state.get("fingerprint") != fingerprint:
        raise FailedPreconditionError(
            f"resume: {source.path} (or its vectors, format or limit) changed since the checkpoint was written; "
            "run without --resume to ingest it from the start")
    return int(state["position"])


def _batches(collection: CollectionHandle, source: Source, start: int, total: int, job: str, fingerprint: str,
             encoder: Encoder | None, batch_size: int, fit_size: int, ray: RayOptions | None) -> Iterator[UpsertBatch]:
    local_unfitted = hasattr(collection, "fit_codec") and not collection.info()["codec_fitted"]
    first = fit_size if local_unfitted and start == 0 else batch_size  # the codec's fitting sample
    read = ray_batches(source, start, batch_size, ray) if ray is not None else \
        source.batches(start, batch_size, first=first)

    def upserts() -> Iterator[UpsertBatch]:
        for batch in read:
            texts = [d.text for d in batch.documents]
            vectors = batch.vectors
            if vectors is None and encoder is not None:
                vectors = encoder.encode(texts, kind="document", show_progress=False)
            state = {"fingerprint": fingerprint, "position": batch.end, "total": total, "done": batch.end >= total,
                     "source": str(source.path), "updated": round(time.time(), 3)}
            yield UpsertBatch([d.id for d in batch.documents], texts, vectors, [d.metadata for d in batch.documents],
                              (job, state))

    return _fit_first(collection, upserts(), fit_size)


def _fit_first(collection: Any, batches: Iterator[UpsertBatch], fit_size: int) -> Iterator[UpsertBatch]:
    """Fit an embedded collection's codec on the first batch's vectors before it is written (else
    the collection stages float32 until it can fit by itself)."""
    for batch in batches:
        if hasattr(collection, "fit_codec") and batch.vectors is not None and not collection.codec.fitted \
                and len(batch.vectors) >= collection.codec.min_fit_size:
            collection.fit_codec(batch.vectors[:fit_size])
        yield batch
