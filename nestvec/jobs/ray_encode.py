"""The ingest job's encoding on a Ray cluster.

Ray Data reads the input and splits it into blocks, `map_batches` encodes them on an actor pool
(one model per actor, one GPU each when the cluster has GPUs), and the batches come back to the
driver in input order. The driver stays the only writer: each batch is written with its
checkpoint exactly as in the single-process job, so a resumed job continues where the last
committed batch ended whichever machines encoded it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from nestvec.datasets import Document, document_text
from nestvec.errors import invalid
from nestvec.jobs.sources import PARQUET_ID_COLUMNS, Batch, Source


@dataclass(frozen=True)
class RayOptions:
    model: str                    # the encoder every actor loads
    address: str | None = None    # None or "": start or join a local Ray; else the cluster's address
    precision: str = "auto"
    actors: int | None = None     # default: one per GPU, else one per CPU of the cluster but one
    layers: int | None = None     # transformer layers kept (2D Matryoshka); None: all


class _EncodeActor:
    """One per Ray worker: loads the model once, then encodes every batch it is handed."""

    def __init__(self, model: str, precision: str, layers: int | None = None) -> None:
        from nestvec.encoders import load_encoder

        self.encoder = load_encoder(model, precision, layers)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [document_text(str(t or ""), str(x or "")) for t, x in zip(batch["title"], batch["text"], strict=True)]
        vectors = self.encoder.encode(texts, kind="document", show_progress=False)
        return {"id": batch["id"], "doc": np.array(texts, dtype=object), "metadata": batch["metadata"],
                "vector": vectors}


def _normalise(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Columns the actors expect, whatever the input called them."""
    n = len(next(iter(batch.values())))
    ids = next((batch[c] for c in PARQUET_ID_COLUMNS if c in batch), None)
    if ids is None or "text" not in batch:
        raise invalid("corpus", f"a Ray input needs an '_id' (or 'id') and a 'text' column, got {sorted(batch)}")
    empty = np.array([""] * n, dtype=object)
    metadata = batch.get("metadata", np.array([None] * n, dtype=object))
    return {"id": np.array([str(i) for i in ids], dtype=object), "title": batch.get("title", empty),
            "text": batch["text"], "metadata": np.array([m if isinstance(m, dict) else {} for m in metadata],
                                                        dtype=object)}


def ray_batches(source: Source, start: int, batch_size: int, options: RayOptions) -> Iterator[Batch]:
    """Encoded batches of `source` from position `start` on, in input order."""
    import ray
    import ray.data

    if source.format not in ("jsonl", "parquet"):
        raise invalid("format", "--ray reads JSONL or Parquet inputs (plain text has no ids to keep in order)")
    if source.dim is not None:
        raise invalid("vectors", "--ray spreads the encoding; an input with --vectors has nothing to encode")
    if not ray.is_initialized():
        ray.init(address=options.address or None, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # positions (and so checkpoints) follow the input
    context.enable_progress_bars = False  # the job draws its own bar
    path = str(source.path)
    dataset: Any = ray.data.read_parquet(path) if source.format == "parquet" else ray.data.read_json(path)
    if source.limit:
        dataset = dataset.limit(source.limit)
    if start:
        dataset = dataset.split_at_indices([start])[1]
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    # Leave a CPU for Ray Data's read tasks: actors holding every CPU starve the reads (a hang).
    pool = options.actors or max(1, int(ray.cluster_resources().get("GPU", 0)) if gpus else
                                 int(ray.cluster_resources().get("CPU", 2)) - 1)
    encoded = dataset.map_batches(_normalise, batch_format="numpy").map_batches(
        _EncodeActor, fn_constructor_args=(options.model, options.precision, options.layers), batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=pool), num_gpus=gpus, batch_format="numpy")
    at = start
    for out in encoded.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
        docs = [Document(str(i), str(d), m if isinstance(m, dict) else {})
                for i, d, m in zip(out["id"], out["doc"], out["metadata"], strict=True)]
        yield Batch(at, docs, np.asarray(np.stack(list(out["vector"])), dtype=np.float32))
        at += len(docs)
