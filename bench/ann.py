"""ANN on wiki250k (150,000 real MiniLM passage vectors, 1,000 real queries): nestvec vs faiss.

Builds each index once (cached under <repo>/.cache/ann/), then measures every (index, knob) in its
own child process, one query per call, one thread: recall@10 against the exact top-10
(gt_top100_ids.npy), p50 / p99 latency warm, anonymous RAM after opening the index (RssAnon
delta), disk bytes, and cold bytes read per query (/proc/self/io read_bytes with the index files
evicted from the page cache before every query, on the first 100 queries). Peers as
../shared/PEERS.md describes them: faiss IVF-Flat (nlist 1549) in RAM, and the same IVF with
OnDiskInvertedLists (prefetch_nthread = 0). Writes JSON and a recall / latency plot.

Capped rows: the child moves itself into a cgroup v1 memory group capped at its own memory at that
moment plus 10% of the float32 vector bytes (page cache counts), evicts the index files, then opens
the index and runs the queries cold; bytes read per query come from /proc/self/io. Note that
posix_fadvise(DONTNEED) cannot drop pages a process still maps, so the warm rows' "cold" columns
read 0 for memory-mapped indexes; the capped rows are the disk figures.

    python bench/ann.py [--nestvec-nprobe 16,32,64,96] [--ivf-nprobe 16,32,64,128] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "ann"
NLIST = 1549


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


# ---- build (parent) ------------------------------------------------------------------------------
def build_all(base: np.ndarray) -> dict[str, float]:
    import faiss
    import lmdb

    from nestvec.compression import make_codec
    from nestvec.index.spann import SpannConfig, SpannIndex

    seconds: dict[str, float] = {}
    codec = make_codec("int8", base.shape[1]).fit(base[np.random.default_rng(0).choice(len(base), 4096, False)])
    spann_dir = CACHE / "nestvec-spann"
    if not (spann_dir / "spann.json").exists():
        spann_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        codec.save(spann_dir / "codec")
        env = lmdb.open(str(spann_dir / "postings.lmdb"), map_size=4 << 30, max_dbs=8, readahead=False)
        SpannIndex.build(base, np.arange(len(base)), codec, env, SpannConfig()).save(spann_dir)
        env.close()
        seconds["nestvec-spann"] = time.perf_counter() - start
    flat_dir = CACHE / "nestvec-flat"
    if not (flat_dir / "codes.npy").exists():
        flat_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        codec.save(flat_dir / "codec")
        np.save(flat_dir / "codes.npy", codec.encode(base))
        seconds["nestvec-flat"] = time.perf_counter() - start
    ivf_path = CACHE / "faiss-ivf" / "ivf.index"
    if not ivf_path.exists():
        ivf_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        quantizer = faiss.IndexFlatIP(base.shape[1])
        ivf = faiss.IndexIVFFlat(quantizer, base.shape[1], NLIST, faiss.METRIC_INNER_PRODUCT)
        ivf.train(base)
        ivf.add(base)
        faiss.write_index(ivf, str(ivf_path))
        seconds["faiss-ivf"] = time.perf_counter() - start
    ondisk = CACHE / "faiss-ondisk" / "ondisk.index"
    if not ondisk.exists():
        ondisk.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        ivf = faiss.read_index(str(ivf_path))
        invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ondisk.with_suffix(".ivfdata")))
        vec = faiss.InvertedListsPtrVector()
        vec.push_back(ivf.invlists)
        invlists.merge_from_multiple(vec.data(), vec.size())
        ivf.replace_invlists(invlists)
        faiss.write_index(ivf, str(ondisk))
        seconds["faiss-ondisk"] = time.perf_counter() - start
    return seconds


# ---- measure (child) -----------------------------------------------------------------------------
def open_index(kind: str) -> Any:
    """Returns search(query [1, d], k) -> ids [1, k]."""
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
    import faiss

    index = faiss.read_index(str(CACHE / kind / ("ivf.index" if kind == "faiss-ivf" else "ondisk.index")))
    if kind == "faiss-ondisk":
        faiss.extract_index_ivf(index).invlists.this.own = True
        invlists = faiss.downcast_InvertedLists(index.invlists)
        invlists.prefetch_nthread = 0
    return index


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


def child(kind: str, knob: int, capped: bool = False) -> dict[str, Any]:
    import faiss

    faiss.omp_set_num_threads(1)
    queries = np.load(shared() / "minilm_queries_fp16.npy").astype(np.float32)
    gt = np.load(shared() / "gt_top100_ids.npy")[:, :10]
    group, limit = enter_memory_cap() if capped else (None, 0)
    if capped:
        evict(files_of(kind))
    anon_before = proc_value("/proc/self/status", "RssAnon")
    index = open_index(kind)
    anon_after = proc_value("/proc/self/status", "RssAnon")

    def search(q: np.ndarray) -> np.ndarray:
        if kind == "nestvec-spann":
            return index.search(q, 10, nprobe=knob)[1]
        if kind == "nestvec-flat":
            return index.search(q, 10)[1]
        index.nprobe = knob
        return index.search(q, 10)[1]

    if not capped:
        for q in queries[:50]:
            search(q[None, :])  # warm
    latencies, found = [], []
    read_before = proc_value("/proc/self/io", "read_bytes")
    for q in queries:
        start = time.perf_counter()
        ids = search(q[None, :])
        latencies.append(time.perf_counter() - start)
        found.append(ids[0])
    read_per_query = (proc_value("/proc/self/io", "read_bytes") - read_before) / len(queries)
    recall = float(np.mean([len(set(f.tolist()) & set(g.tolist())) / 10 for f, g in zip(found, gt, strict=True)]))
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
        search(q[None, :])
        cold_lat.append(time.perf_counter() - start)
        cold_reads.append(proc_value("/proc/self/io", "read_bytes") - before)
    return {"index": kind, "knob": knob, "mode": "warm", "recall@10": recall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "anon_ram_mb": (anon_after - anon_before) / 1e6,
            "anon_ram_after_queries_mb": (proc_value("/proc/self/status", "RssAnon") - anon_before) / 1e6,
            "disk_mb": sum(p.stat().st_size for p in files) / 1e6,
            "cold_read_mb_per_query": float(np.mean(cold_reads)) / 1e6,
            "cold_p50_ms": float(np.percentile(np.array(cold_lat) * 1000, 50))}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in dict.fromkeys(r["index"] for r in rows):
        mine = [r for r in rows if r["index"] == kind]
        ax.plot([r["p50_ms"] for r in mine], [r["recall@10"] for r in mine], "o-", label=kind)
        for r in mine:
            ax.annotate(str(r["knob"]), (r["p50_ms"], r["recall@10"]), fontsize=7, xytext=(3, -8),
                        textcoords="offset points")
    ticks = [0.2, 0.5, 1, 2, 5, 10]
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set(xlabel="single-query p50 latency, warm (ms, log)", ylabel="recall@10",
           title="wiki250k: 150k MiniLM vectors, 1,000 queries, 1 thread (labels: nprobe)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nestvec-nprobe", default="16,32,64,96")
    parser.add_argument("--ivf-nprobe", default="16,32,64,128")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--capped", default="nestvec-spann@64,nestvec-spann@96,faiss-ondisk@64",
                        help="INDEX@NPROBE runs under a memory cap (own memory + 10%% of vector bytes)")
    parser.add_argument("--child", nargs=3, metavar=("INDEX", "KNOB", "CAPPED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2] == "1")))
        return

    base = np.load(shared() / "minilm_base150k_fp16.npy").astype(np.float32)
    build_seconds = build_all(base)
    del base
    plan = [("nestvec-flat", 0)] + [("nestvec-spann", int(n)) for n in args.nestvec_nprobe.split(",")]
    plan += [(kind, int(n)) for kind in ("faiss-ivf", "faiss-ondisk") for n in args.ivf_nprobe.split(",")]
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kind, knob in plan:
        out = subprocess.run([sys.executable, __file__, "--child", kind, str(knob), "0"], capture_output=True,
                             text=True, env=env, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{kind:<14} knob {knob:>4}: recall@10 {row['recall@10']:.4f}  p50 {row['p50_ms']:6.2f} ms  "
              f"p99 {row['p99_ms']:6.2f} ms  anon {row['anon_ram_mb']:6.1f} MB  disk {row['disk_mb']:6.1f} MB",
              flush=True)
    capped = []
    for level in [c for c in args.capped.split(",") if c]:
        kind, knob = level.split("@")
        out = subprocess.run([sys.executable, __file__, "--child", kind, knob, "1"], capture_output=True, text=True,
                             env=env)
        if out.returncode != 0:  # the OOM killer is a result too
            row = {"index": kind, "knob": int(knob), "mode": "capped", "failed": f"exit {out.returncode}",
                   "stderr": out.stderr[-500:]}
            print(f"{kind:<14} knob {knob:>4} CAPPED: exit {out.returncode}", flush=True)
        else:
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{kind:<14} knob {knob:>4} CAPPED ({row['cap_mb']:.0f} MB): recall@10 {row['recall@10']:.4f}  "
                  f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  read {row['read_mb_per_query']:.2f} MB/q",
                  flush=True)
        capped.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"metadata": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "base": 150_000,
                           "queries": 1000, "threads": 1, "nlist_faiss": NLIST,
                           "build_seconds_this_run": build_seconds,
                           "float32_vector_bytes_mb": 150_000 * 384 * 4 / 1e6, "cap_extra_mb": CAP_EXTRA / 1e6},
              "rows": rows, "capped": capped}
    (args.out / "ann.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(rows, args.out / "ann.png")
    print(f"wrote {args.out / 'ann.json'} and {args.out / 'ann.png'}")


if __name__ == "__main__":
    main()
