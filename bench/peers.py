"""Peer adapters for bench/ann.py: faiss HNSW, LanceDB IVF_PQ and DiskANN's disk index.

Each peer is built once into its own folder (bench/ann.py passes <repo>/.cache/ann/<kind>/) and opened
by a measuring child process; `search(index, kind, queries, k, knob)` answers a batch of queries
[n, d] -> ids [n, k] (-1 padded) with one call to the library, so a batch of one is a single query.

- faiss-hnsw: faiss `IndexHNSWFlat(384, 32, METRIC_INNER_PRODUCT)` (efConstruction 40, faiss's
  default), knob = `hnsw.efSearch`.
- lancedb-ivfpq: a LanceDB table (id int64, vector float32[384]) with an IVF_PQ index: 1024
  partitions, 96 sub-vectors of 8 bits, distance "dot" (the vectors are unit length, so dot and
  cosine rank alike); queries use refine_factor 10 (re-scores 100 candidates with the stored float32
  vectors); knob = nprobes. Queries run with LANCE_CPU_THREADS = LANCE_IO_THREADS = RAYON_NUM_THREADS
  = TOKIO_WORKER_THREADS = 1 (`THREAD_ENV`, set before lancedb is imported). The build runs with
  lance's default threads: with all four set to 1 the IVF_PQ build hangs (lancedb 0.40.0).
- diskann: diskannpy 0.7.0 disk index (`StaticDiskIndex`), metric "l2" (unit vectors: the same
  ranking as inner product; "cosine" is not supported for disk indexes and "mips" adds a dimension),
  graph degree R 64, build complexity 100, PQ of 96 bytes per vector held in memory for navigation,
  10,000 nodes cached in memory (DiskANN's usual setting), beam width 2; knob = search complexity L.
  Built with 2 threads. Installing it: diskannpy 0.7.0 pins numpy==1.25, which nestvec's numpy>=1.26
  excludes (and which breaks ml-dtypes and scipy), so it is not in the `bench` extra; install it with
  `pip install --no-deps diskannpy==0.7.0` (its wheel runs on numpy 2.x). Three workarounds, all
  found on this install (numpy 2.4):
  1. `StaticDiskIndex(..., num_threads=1)` deadlocks while loading (its scratch queue is empty when
     it reads the medoid; DiskANN issue #462), so it is opened with 2 scratch contexts. Searches
     still run on one thread: the caller's, through `batch_search(..., num_threads=1)`.
  2. `StaticDiskIndex.search` (the one-vector call) returns one id repeated k times with distance 0,
     so single queries go through `batch_search` with a batch of one, which returns correct results.
  3. The build leaves two copies of the float32 vectors that the disk index never reads
     (`ann_vectors.bin`, the input, and `ann_mem.index.data`, the in-memory graph's data); they are
     deleted after the build so that disk MB counts what a search needs (PEERS.md's 762 MB kept them).
  Its reads use O_DIRECT (libaio), so the page cache plays no part: warm and cold rows both read the
  disk for every node outside the cache.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np

PEERS = ("faiss-hnsw", "lancedb-ivfpq", "diskann")
THREAD_ENV = {"LANCE_CPU_THREADS": "1", "LANCE_IO_THREADS": "1", "RAYON_NUM_THREADS": "1",
              "TOKIO_WORKER_THREADS": "1"}
PACKAGE = {"faiss-hnsw": "faiss", "lancedb-ivfpq": "lancedb", "diskann": "diskannpy"}

HNSW_M = 32
LANCE_PARTITIONS = 1024
LANCE_SUB_VECTORS = 96
LANCE_REFINE = 10
LANCE_TABLE = "wiki"
DISKANN_R = 64
DISKANN_BUILD_L = 100
DISKANN_PQ_BYTES = 96
DISKANN_CACHE_NODES = 10_000
DISKANN_BEAM = 2
DISKANN_BUILD_THREADS = 2


def missing(kind: str) -> str | None:
    """Why this peer cannot run here (its package does not import), or None."""
    try:
        importlib.import_module(PACKAGE[kind])
    except Exception as exc:  # an ImportError, or a broken binary wheel
        return f"{PACKAGE[kind]} does not import: {exc!r}"
    return None


def prepare(kind: str) -> None:
    """Thread settings and imports, done before the child measures memory or enters its cap."""
    if kind == "lancedb-ivfpq":
        for key, value in THREAD_ENV.items():
            os.environ.setdefault(key, value)
    importlib.import_module(PACKAGE[kind])
    if kind == "lancedb-ivfpq":
        import pyarrow  # noqa: F401


def built(kind: str, folder: Path) -> bool:
    marker = {"faiss-hnsw": "hnsw.index", "lancedb-ivfpq": "built.ok", "diskann": "built.ok"}[kind]
    return (folder / marker).exists()


def build(kind: str, base: np.ndarray, folder: Path) -> None:
    """Builds the peer's index from float32 vectors (row i has id i) into an empty `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "faiss-hnsw":
        import faiss

        index = faiss.IndexHNSWFlat(base.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.add(base)
        faiss.write_index(index, str(folder / "hnsw.index"))
    elif kind == "lancedb-ivfpq":
        import lancedb
        import pyarrow as pa
        from lancedb.index import IvfPq

        table = pa.table({"id": pa.array(np.arange(len(base)), pa.int64()),
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(base.ravel()), base.shape[1])})
        tbl = lancedb.connect(str(folder)).create_table(LANCE_TABLE, table, mode="overwrite")
        tbl.create_index("vector", config=IvfPq(distance_type="dot", num_partitions=LANCE_PARTITIONS,
                                                num_sub_vectors=LANCE_SUB_VECTORS))
        (folder / "built.ok").write_text("ok\n")
    elif kind == "diskann":
        import diskannpy

        for name in os.listdir(folder):  # the builder refuses to overwrite its own input copy
            (folder / name).unlink()
        diskannpy.build_disk_index(base, "l2", str(folder), complexity=DISKANN_BUILD_L, graph_degree=DISKANN_R,
                                   search_memory_maximum=DISKANN_PQ_BYTES * len(base) / 2**30 * 1.001,
                                   build_memory_maximum=4.0, num_threads=DISKANN_BUILD_THREADS)
        for leftover in ("ann_vectors.bin", "ann_mem.index.data"):  # not read by a disk index search
            (folder / leftover).unlink(missing_ok=True)
        (folder / "built.ok").write_text("ok\n")
    else:
        raise ValueError(f"unknown peer {kind!r}")


def open_peer(kind: str, folder: Path) -> Any:
    if kind == "faiss-hnsw":
        import faiss

        return faiss.read_index(str(folder / "hnsw.index"))
    if kind == "lancedb-ivfpq":
        import lancedb

        return lancedb.connect(str(folder)).open_table(LANCE_TABLE)
    if kind == "diskann":
        import diskannpy

        # num_threads=2: with 1 the loader deadlocks (see the module docstring); searches use 1 thread.
        return diskannpy.StaticDiskIndex(str(folder), num_threads=2, num_nodes_to_cache=DISKANN_CACHE_NODES)
    raise ValueError(f"unknown peer {kind!r}")


def search(index: Any, kind: str, queries: np.ndarray, k: int, knob: int) -> np.ndarray:
    """ids [n, k] for queries [n, d] (float32), one library call, one thread."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if kind == "faiss-hnsw":
        index.hnsw.efSearch = knob
        return index.search(queries, k)[1]
    if kind == "lancedb-ivfpq":
        query = queries[0] if len(queries) == 1 else queries
        found = (index.search(query, vector_column_name="vector").distance_type("dot").nprobes(knob)
                 .refine_factor(LANCE_REFINE).limit(k).select(["id", "_distance"]).to_arrow())
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        got = found["id"].to_numpy()
        which = found["query_index"].to_numpy() if len(queries) > 1 else np.zeros(len(got), dtype=np.int64)
        order = np.lexsort((found["_distance"].to_numpy(), which))
        got, which = got[order], which[order]
        starts = np.searchsorted(which, np.arange(len(queries)))
        for qi in range(len(queries)):
            mine = got[starts[qi]:starts[qi + 1] if qi + 1 < len(queries) else len(got)][:k]
            ids[qi, : len(mine)] = mine
        return ids
    if kind == "diskann":
        return index.batch_search(queries, k, knob, num_threads=1, beam_width=DISKANN_BEAM).identifiers
    raise ValueError(f"unknown peer {kind!r}")
