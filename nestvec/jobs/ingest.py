"""Bulk ingest: encode documents in batches and write each batch in one transaction."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from nestvec.collection import Collection
from nestvec.datasets import Document

DEFAULT_BATCH = 512
DEFAULT_FIT_SIZE = 4096


@dataclass(frozen=True)
class IngestSummary:
    documents: int
    seconds: float
    docs_per_second: float
    disk_bytes: int
    bytes_per_vector: int
    compression_ratio: float


def ingest_documents(collection: Collection, documents: Sequence[Document], *, batch_size: int = DEFAULT_BATCH,
                     fit_size: int = DEFAULT_FIT_SIZE, progress: bool = True) -> IngestSummary:
    """Encode and upsert `documents`; an unfitted codec is fitted on the first `fit_size` of them."""
    start = time.perf_counter()
    encoder = collection.encoder
    first = fit_size if not collection.codec.fitted else batch_size
    bounds = [0, *range(min(first, len(documents)), len(documents), batch_size), len(documents)]
    bar = tqdm(total=len(documents), unit="doc", disable=not progress, desc=f"ingest {collection.name}")
    for lo, hi in itertools.pairwise(bounds):
        batch = documents[lo:hi]
        if not batch:
            continue
        texts = [d.text for d in batch]
        vectors = encoder.encode(texts, kind="document", show_progress=False)
        if not collection.codec.fitted and len(vectors) >= collection.codec.min_fit_size:
            collection.fit_codec(vectors)  # else the collection stages float32 until it can fit
        collection.upsert([d.id for d in batch], texts=texts, vectors=vectors,
                          metadata=[d.metadata for d in batch])
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start
    info = collection.info()
    return IngestSummary(
        documents=len(documents), seconds=round(seconds, 2),
        docs_per_second=round(len(documents) / max(seconds, 1e-9), 1),
        disk_bytes=int(info["disk_bytes"]), bytes_per_vector=int(info["bytes_per_vector"]),
        compression_ratio=float(np.round(info["compression_ratio"], 2)),
    )
