"""ANN on wiki250k (150,000 real MiniLM passage vectors, 1,000 real queries): nestvec vs its peers.

Builds each index once (cached under <repo>/.cache/ann/<kind>/), then measures every (index, knob) in
its own child process, one query per call, one thread: recall@10 against the exact top-10
(gt_top100_ids.npy), p50 / p99 latency warm, anonymous RAM after opening the index (RssAnon
delta), disk bytes, and cold bytes read per query (/proc/self/io read_bytes with the index files
evicted from the page cache before every query, on the first 100 queries). Writes JSON and a
recall / latency plot.

Indexes (`--only` picks some of them; knob in brackets):
- nestvec-flat: nestvec's int8 flat scan [none];
- nestvec-spann: nestvec's SPANN-like index, lists in LMDB [nprobe];
and the peers, run as ../shared/PEERS.md describes:
- faiss-ivf: faiss IVF-Flat, nlist 1549, in RAM [nprobe];
- faiss-ondisk: the same IVF with OnDiskInvertedLists, prefetch_nthread = 0 [nprobe];
- faiss-hnsw: faiss IndexHNSWFlat(384, 32, METRIC_INNER_PRODUCT) [efSearch];
- lancedb-ivfpq: LanceDB IVF_PQ, 1024 partitions, 96 sub-vectors, dot, refine_factor 10, with
  LANCE_CPU_THREADS / LANCE_IO_THREADS / RAYON_NUM_THREADS / TOKIO_WORKER_THREADS = 1 [nprobes];
- diskann: diskannpy 0.7.0 disk index, R 64, PQ 96 bytes, 10,000 cached nodes [search complexity L];
  installed apart (`pip install --no-deps diskannpy==0.7.0`: it pins numpy 1.25); skipped, with a
  note, where it does not import.
bench/peers.py holds the peer adapters and the details (and the workarounds diskannpy needs here).

Capped rows: the child imports its index's library, moves itself into a cgroup v1 memory group
capped at its own memory at that moment plus 10% of the float32 vector bytes (page cache counts),
evicts the index files, then opens the index and runs the queries cold; bytes read per query come
from /proc/self/io. A child the OOM killer ends is recorded as failed. Note that
posix_fadvise(DONTNEED) cannot drop pages a process still maps, so the warm rows' "cold" columns
read 0 for memory-mapped indexes; the capped rows are the disk figures.

Batched rows ("batched" in the JSON): all 1,000 queries in ONE call, one thread, warm, at the knob
whose recall@10 is nearest 0.95 (nestvec-spann's batch path reads each posting list once for all
the queries that probe it): seconds, QPS, recall@10.

    python bench/ann.py [--only faiss-hnsw,lancedb-ivfpq] [--nestvec-nprobe 16,32,64,96]
        [--ivf-nprobe 16,32,64,128] [--hnsw-ef 32,64,128] [--lance-nprobes 16,32,64]
        [--diskann-l 32,64,128] [--capped KIND@KNOB,...] [--batched KIND@KNOB,...] [--build-only]
        [--out bench/results]
    python bench/ann.py --child KIND KNOB 0|1|batch    (one measurement; prints its JSON row)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:
    from bench import peers
except ImportError:  # run as a script: bench/ is sys.path[0]
    import peers  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "ann"
NLIST = 1549
NESTVEC = ("nestvec-flat", "nestvec-spann")
FAISS_IVF = ("faiss-ivf", "faiss-ondisk")
KINDS = NESTVEC + FAISS_IVF + peers.PEERS
DEFAULT_CAPPED = ("nestvec-spann@64,nestvec-spann@96,nestvec-spann@128,faiss-ondisk@64,lancedb-ivfpq@32,"
                  "lancedb-ivfpq@64,diskann@64,faiss-hnsw@64")
# The knob giving recall@10 nearest 0.95 for each index (PEERS.md and bench/results/ann.json).
DEFAULT_BATCHED = ("nestvec-flat@0,nestvec-spann@96,nestvec-spann@128,faiss-ivf@64,faiss-ondisk@64,faiss-hnsw@64,"
                   "lancedb-ivfpq@32,diskann@64")


def shared() -> Path:
    root = os.environ.get("NESTVEC_SHARED")
    return (Path(root) if root else REPO.parent / "shared") / "data" / "wiki250k"


def proc_value(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * (1024 if path.endswith("status") else 1)
    return 0


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_of(kind: str) -> list[Path]:
    folder = CACHE / kind
    return [p for p in folder.rglob("*") if p.is_file()]


def unavailable(kind: str) -> str | None:
    """Why `kind` cannot run here (a peer whose package does not import), or None."""
    return peers.missing(kind) if kind in peers.PEERS else None


# ---- build (parent) ------------------------------------------------------------------------------
def is_built(kind: str) -> bool:
    folder = CACHE / kind
    marker = {"nestvec-spann": "spann.json", "nestvec-flat": "codes.npy", "faiss-ivf": "ivf.index",
              "faiss-ondisk": "ondisk.index"}
    return (folder / marker[kind]).exists() if kind in marker else peers.built(kind, folder)


def build_all(kinds: list[str], load_base: Callable[[], np.ndarray]) -> dict[str, float]:
    """Builds the missing indexes among `kinds`, one at a time; returns their build seconds."""
    needed = [kind for kind in kinds if not is_built(kind)]
    if "faiss-ondisk" in needed and not is_built("faiss-ivf"):
        needed.insert(needed.index("faiss-ondisk"), "faiss-ivf")  # the on-disk index is made from it
    seconds: dict[str, float] = {}
    if not needed:
        return seconds
    base = load_base()
    codec = None
    for kind in dict.fromkeys(needed):
        print(f"building {kind} ...", flush=True)
        start = time.perf_counter()
        if kind in NESTVEC:
            if codec is None:
                from nestvec.compression import make_codec

                sample = base[np.random.default_rng(0).choice(len(base), 4096, False)]
                codec = make_codec("int8", base.shape[1]).fit(sample)
            build_nestvec(kind, base, codec)
        elif kind in FAISS_IVF:
            build_faiss_ivf(kind, base)
        else:
            peers.build(kind, base, CACHE / kind)
        seconds[kind] = time.perf_counter() - start
        print(f"built {kind} in {seconds[kind]:.0f} s", flush=True)
    return seconds


def build_nestvec(kind: str, base: np.ndarray, codec: Any) -> None:
    folder = CACHE / kind
    folder.mkdir(parents=True, exist_ok=True)
    codec.save(folder / "codec")
    if kind == "nestvec-flat":
        np.save(folder / "codes.npy", codec.encode(base))
        return
    import lmdb

    from nestvec.index.spann import SpannConfig, SpannIndex

    env = lmdb.open(str(folder / "postings.lmdb"), map_size=4 << 30, max_dbs=8, readahead=False)
    SpannIndex.build(base, np.arange(len(base)), codec, env, SpannConfig()).save(folder)
    env.close()


def build_faiss_ivf(kind: str, base: np.ndarray) -> None:
    import faiss

    ivf_path = CACHE / "faiss-ivf" / "ivf.index"
    if kind == "faiss-ivf":
        ivf_path.parent.mkdir(parents=True, exist_ok=True)
        quantizer = faiss.IndexFlatIP(base.shape[1])
        ivf = faiss.IndexIVFFlat(quantizer, base.shape[1], NLIST, faiss.METRIC_INNER_PRODUCT)
        ivf.train(base)
        ivf.add(base)
        faiss.write_index(ivf, str(ivf_path))
        return
    ondisk = CACHE / "faiss-ondisk" / "ondisk.index"
    ondisk.parent.mkdir(parents=True, exist_ok=True)
    ivf = faiss.read_index(str(ivf_path))
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ondisk.with_suffix(".ivfdata")))
    vec = faiss.InvertedListsPtrVector()
    vec.push_back(ivf.invlists)
    invlists.merge_from_multiple(vec.data(), vec.size())
    ivf.replace_invlists(invlists)
    faiss.write_index(ivf, str(ondisk))


# ---- measure (child) -----------------------------------------------------------------------------
def prepare(kind: str) -> None:
    """Imports the index's libraries (and sets their thread counts) before memory is measured or capped."""
    if kind in NESTVEC:
        import lmdb  # noqa: F401

        import nestvec.compression
        import nestvec.index.flat
        import nestvec.index.spann  # noqa: F401
    elif kind in peers.PEERS:
        peers.prepare(kind)


def open_index(kind: str) -> Any:
    if kind == "nestvec-spann":
        import lmdb

        from nestvec.compression import Codec
        from nestvec.index.spann import SpannIndex

        folder = CACHE / kind
        env = lmdb.open(str(folder / "postings.lmdb"), readonly=True, lock=False, max_dbs=8, readahead=False)
        return SpannIndex.load(folder, Codec.load(folder / "codec"), env)
    if kind == "nestvec-flat":
        from nestvec.compression import Codec
        from nestvec.index.flat import FlatIndex

        folder = CACHE / kind
        index = FlatIndex(Codec.load(folder / "codec"))
        index.append(np.load(folder / "codes.npy"))
        return index
    if kind in peers.PEERS:
        return peers.open_peer(kind, CACHE / kind)
    import faiss

    index = faiss.read_index(str(CACHE / kind / ("ivf.index" if kind == "faiss-ivf" else "ondisk.index")))
    if kind == "faiss-ondisk":
        faiss.extract_index_ivf(index).invlists.this.own = True
        invlists = faiss.downcast_InvertedLists(index.invlists)
        invlists.prefetch_nthread = 0
    return index


def search(kind: str, index: Any, queries: np.ndarray, knob: int) -> np.ndarray:
    """Top-10 ids [n, 10] for queries [n, d] in ONE call to the index (n = 1: a single query)."""
    if kind == "nestvec-spann":
        return index.search(queries, 10, nprobe=knob)[1]
    if kind == "nestvec-flat":
        return index.search(queries, 10)[1]
    if kind in peers.PEERS:
        return peers.search(index, kind, queries, 10, knob)
    index.nprobe = knob
    return index.search(queries, 10)[1]


def recall_at_10(found: np.ndarray | list[np.ndarray], gt: np.ndarray) -> float:
    return float(np.mean([len(set(np.asarray(f).tolist()) & set(g.tolist())) / 10
                          for f, g in zip(found, gt, strict=True)]))


CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
CAP_EXTRA = int(150_000 * 384 * 4 * 0.10)  # 10% of the float32 vector bytes: 23 MB


def enter_memory_cap() -> tuple[Path, int]:
    """Move this process into a fresh cgroup v1 memory group capped at its usage now + CAP_EXTRA."""
    group = CGROUP_ROOT / f"nestvec_ann_{os.getpid()}"
    group.mkdir()
    (group / "cgroup.procs").write_text(str(os.getpid()))
    usage = int((group / "memory.usage_in_bytes").read_text())
    own = proc_value("/proc/self/status", "VmRSS")
    limit = max(usage, own) + CAP_EXTRA
    (group / "memory.limit_in_bytes").write_text(str(limit))
    return group, limit


def leave_memory_cap(group: Path) -> None:
    (CGROUP_ROOT / "cgroup.procs").write_text(str(os.getpid()))
    group.rmdir()


def child(kind: str, knob: int, mode: str = "0") -> dict[str, Any]:
    """One measurement in this process. mode "0": warm single queries (+ cold reads); "1": single
    queries under the memory cap; "batch": all queries in one call, warm."""
    import faiss
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # BLAS / OpenMP pools already loaded (the parent also sets OMP_NUM_THREADS=1)
    faiss.omp_set_num_threads(1)
    queries = np.load(shared() / "minilm_queries_fp16.npy").astype(np.float32)
    gt = np.load(shared() / "gt_top100_ids.npy")[:, :10]
    prepare(kind)
    capped = mode == "1"
    group, limit = enter_memory_cap() if capped else (None, 0)
    if capped:
        evict(files_of(kind))
    anon_before = proc_value("/proc/self/status", "RssAnon")
    index = open_index(kind)
    threadpool_limits(1)  # and the pools the index's library brought
    anon_after = proc_value("/proc/self/status", "RssAnon")

    if mode == "batch":
        search(kind, index, queries[:50], knob)  # warm: the index's own caches and the page cache
        start = time.perf_counter()
        ids = search(kind, index, queries, knob)
        seconds = time.perf_counter() - start
        return {"index": kind, "knob": knob, "mode": "batched", "queries": len(queries), "seconds": seconds,
                "qps": len(queries) / seconds, "recall@10": recall_at_10(ids, gt)}

    if not capped:
        for q in queries[:50]:
            search(kind, index, q[None, :], knob)  # warm
    latencies, found = [], []
    read_before = proc_value("/proc/self/io", "read_bytes")
    for q in queries:
        start = time.perf_counter()
        ids = search(kind, index, q[None, :], knob)
        latencies.append(time.perf_counter() - start)
        found.append(ids[0])
    read_per_query = (proc_value("/proc/self/io", "read_bytes") - read_before) / len(queries)
    recall = recall_at_10(found, gt)
    files = files_of(kind)
    lat = np.array(latencies) * 1000
    if group is not None:
        leave_memory_cap(group)
        return {"index": kind, "knob": knob, "mode": "capped", "cap_mb": limit / 1e6, "recall@10": recall,
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "read_mb_per_query": read_per_query / 1e6, "anon_ram_mb": (anon_after - anon_before) / 1e6,
                "disk_mb": sum(p.stat().st_size for p in files) / 1e6}
    cold_reads, cold_lat = [], []
    for q in queries[:100]:
        evict(files)
        before = proc_value("/proc/self/io", "read_bytes")
        start = time.perf_counter()
        search(kind, index, q[None, :], knob)
        cold_lat.append(time.perf_counter() - start)
        cold_reads.append(proc_value("/proc/self/io", "read_bytes") - before)
    return {"index": kind, "knob": knob, "mode": "warm", "recall@10": recall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "anon_ram_mb": (anon_after - anon_before) / 1e6,
            "anon_ram_after_queries_mb": (proc_value("/proc/self/status", "RssAnon") - anon_before) / 1e6,
            "disk_mb": sum(p.stat().st_size for p in files) / 1e6,
            "cold_read_mb_per_query": float(np.mean(cold_reads)) / 1e6,
            "cold_p50_ms": float(np.percentile(np.array(cold_lat) * 1000, 50))}


def run_child(kind: str, knob: int, mode: str) -> dict[str, Any]:
    """Runs one measurement in a fresh process; a child that fails (the OOM killer too) is a row too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **peers.THREAD_ENV}
    with subprocess.Popen([sys.executable, __file__, "--child", kind, str(knob), mode], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env) as proc:
        stdout, stderr = proc.communicate()
    leftover = CGROUP_ROOT / f"nestvec_ann_{proc.pid}"  # a capped child killed before it could leave its group
    if leftover.exists():
        leftover.rmdir()
    rows = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        return {"index": kind, "knob": knob, "mode": {"0": "warm", "1": "capped"}.get(mode, "batched"),
                "failed": f"exit {proc.returncode}", "stderr": stderr[-500:]}
    return json.loads(rows[-1])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "failed" not in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in dict.fromkeys(r["index"] for r in rows):
        mine = [r for r in rows if r["index"] == kind]
        ax.plot([r["p50_ms"] for r in mine], [r["recall@10"] for r in mine], "o-", label=kind)
        for r in mine:
            ax.annotate(str(r["knob"]), (r["p50_ms"], r["recall@10"]), fontsize=7, xytext=(3, -8),
                        textcoords="offset points")
    ticks = [0.2, 0.5, 1, 2, 5, 10, 20, 50]
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set(xlabel="single-query p50 latency, warm (ms, log)", ylabel="recall@10",
           title="wiki250k: 150k MiniLM vectors, 1,000 queries, 1 thread (labels: nprobe / ef / L)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def levels(spec: str, kinds: list[str]) -> list[tuple[str, int]]:
    """KIND@KNOB,... -> [(kind, knob)] for the selected kinds."""
    out = []
    for item in [c for c in spec.split(",") if c]:
        kind, knob = item.split("@")
        if kind not in KINDS:
            raise SystemExit(f"unknown index {kind!r} in {spec!r}; known: {', '.join(KINDS)}")
        if kind in kinds:
            out.append((kind, int(knob)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="indexes: " + ", ".join(KINDS))
    parser.add_argument("--only", default="", metavar="KINDS",
                        help="comma list of indexes to build and measure (default: all); a run with --only "
                             "writes ann-only.json / ann-only.png, not ann.json")
    parser.add_argument("--nestvec-nprobe", default="32,48,64,96,128,192", help="nestvec-spann nprobe sweep")
    parser.add_argument("--ivf-nprobe", default="16,32,64,128", help="faiss-ivf and faiss-ondisk nprobe sweep")
    parser.add_argument("--hnsw-ef", default="32,64,128", help="faiss-hnsw efSearch sweep")
    parser.add_argument("--lance-nprobes", default="16,32,64", help="lancedb-ivfpq nprobes sweep")
    parser.add_argument("--diskann-l", default="32,64,128", help="diskann search complexity L sweep")
    parser.add_argument("--capped", default=DEFAULT_CAPPED,
                        help="INDEX@KNOB runs under a memory cap (own memory + 10%% of vector bytes)")
    parser.add_argument("--batched", default=DEFAULT_BATCHED,
                        help="INDEX@KNOB runs with all 1,000 queries in one call (1 thread)")
    parser.add_argument("--build-only", action="store_true", help="build the missing indexes, measure nothing")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--child", nargs=3, metavar=("INDEX", "KNOB", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, knob, mode = args.child
        if kind not in KINDS or mode not in ("0", "1", "batch"):
            parser.error(f"--child INDEX KNOB 0|1|batch with INDEX one of {', '.join(KINDS)}")
        real_stdout = os.dup(1)
        os.dup2(2, 1)  # native libraries (DiskANN) print to stdout: keep it for the JSON row alone
        row = child(kind, int(knob), mode)
        sys.stdout.flush()
        os.write(real_stdout, (json.dumps(row) + "\n").encode())
        return

    kinds = [k for k in args.only.split(",") if k] if args.only else list(KINDS)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown index {', '.join(unknown)}; known: {', '.join(KINDS)}")
    skipped = {kind: why for kind in kinds if (why := unavailable(kind))}
    for kind, why in skipped.items():
        print(f"skipping {kind}: {why}", flush=True)
    kinds = [kind for kind in kinds if kind not in skipped]

    def load_base() -> np.ndarray:
        return np.load(shared() / "minilm_base150k_fp16.npy").astype(np.float32)

    build_seconds = build_all(kinds, load_base)
    if args.build_only:
        return
    sweeps = {"nestvec-flat": "0", "nestvec-spann": args.nestvec_nprobe, "faiss-ivf": args.ivf_nprobe,
              "faiss-ondisk": args.ivf_nprobe, "faiss-hnsw": args.hnsw_ef, "lancedb-ivfpq": args.lance_nprobes,
              "diskann": args.diskann_l}
    plan = [(kind, int(n)) for kind in KINDS if kind in kinds for n in sweeps[kind].split(",")]
    rows = []
    for kind, knob in plan:
        row = run_child(kind, knob, "0")
        rows.append(row)
        if "failed" in row:
            print(f"{kind:<14} knob {knob:>4}: {row['failed']}\n{row['stderr']}", flush=True)
            continue
        print(f"{kind:<14} knob {knob:>4}: recall@10 {row['recall@10']:.4f}  p50 {row['p50_ms']:6.2f} ms  "
              f"p99 {row['p99_ms']:6.2f} ms  anon {row['anon_ram_mb']:6.1f} MB  disk {row['disk_mb']:6.1f} MB",
              flush=True)
    capped = []
    for kind, knob in levels(args.capped, kinds):
        row = run_child(kind, knob, "1")
        if "failed" in row:  # the OOM killer is a result too
            print(f"{kind:<14} knob {knob:>4} CAPPED: {row['failed']}", flush=True)
        else:
            print(f"{kind:<14} knob {knob:>4} CAPPED ({row['cap_mb']:.0f} MB): recall@10 {row['recall@10']:.4f}  "
                  f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  read {row['read_mb_per_query']:.2f} MB/q",
                  flush=True)
        capped.append(row)
    batched = []
    for kind, knob in levels(args.batched, kinds):
        row = run_child(kind, knob, "batch")
        if "failed" in row:
            print(f"{kind:<14} knob {knob:>4} BATCHED: {row['failed']}\n{row['stderr']}", flush=True)
        else:
            print(f"{kind:<14} knob {knob:>4} BATCHED ({row['queries']} queries, one call): "
                  f"{row['seconds']:.3f} s  {row['qps']:8.0f} QPS  recall@10 {row['recall@10']:.4f}", flush=True)
        batched.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "ann-only" if args.only else "ann"
    report = {"metadata": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "base": 150_000,
                           "queries": 1000, "threads": 1, "nlist_faiss": NLIST, "indexes": kinds,
                           "skipped": skipped, "build_seconds_this_run": build_seconds,
                           "float32_vector_bytes_mb": 150_000 * 384 * 4 / 1e6, "cap_extra_mb": CAP_EXTRA / 1e6},
              "rows": rows, "capped": capped, "batched": batched}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(rows, args.out / f"{stem}.png")
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")


if __name__ == "__main__":
    main()
