"""Soak: minutes of mixed load on one `nestvec serve` process, with nothing allowed to drift.

A collection of wiki250k passages (shipped MiniLM vectors, sent by the client; SPANN from 20,000)
on a server in its own process (bench/service.py's start_server). Client processes, each with
its own channel, run an open-loop schedule (Poisson arrivals, each operation timed from its
scheduled start, so queueing counts): searches with the real wiki250k query vectors at a fixed
total rate, and a trickle of upserts (new passages and overwrites of stored ones with another
passage's text and vector) and deletes. Each client writes only its own share of the ids, so the
ids it saw acknowledged tell exactly what the collection must hold at the end.

Per interval ("minute", --interval-s): search and write p50 / p99, the search rate achieved,
errors, and the server's resident memory (VmRSS) and open file descriptors; then least-squares
slopes per real minute. Passes with zero errors, no descriptor growth (last sample within
FD_MARGIN of the first), and the count and a sample of contents exactly as acknowledged. RSS
growth is reported, not judged: a short run mostly measures the allocator warming up.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.service import API_KEY, free_port, load_passages, shared_data, start_server

NAME = "soak"
COLLECTION = "soak"
FD_MARGIN = 4  # descriptors the server may hold more at the end than at the start
CONTENT_SAMPLE = 200  # ids per client whose text is read back at the end
JSONLike = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load, in intervals")
    parser.add_argument("--interval-s", type=float, default=60.0, help="seconds per reported interval")
    parser.add_argument("--docs", type=int, default=20_000, help="passages loaded before the load starts")
    parser.add_argument("--index", default="auto", choices=["auto", "flat", "spann"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--search-rate", type=float, default=200.0, help="total searches/s offered")
    parser.add_argument("--upsert-rate", type=float, default=16.0, help="total upsert calls/s offered")
    parser.add_argument("--upsert-batch", type=int, default=4, help="points per upsert call")
    parser.add_argument("--delete-rate", type=float, default=4.0, help="total delete calls/s offered")
    parser.add_argument("--delete-batch", type=int, default=2)
    parser.add_argument("--new-share", type=float, default=0.5, help="upserted points with new ids (else overwrites)")
    parser.add_argument("--seed", type=int, default=0)


# -- one client process ----------------------------------------------------------------------------
@dataclass
class Share:
    """The ids one client may write: its share of the loaded passages and a pool of new ones."""

    base_ids: list[str]
    base_rows: list[int]
    new_ids: list[str]
    new_rows: list[int]
    texts: dict[int, str]  # row -> passage text, for every row above


@dataclass
class Plan:
    url: str
    index: int
    seconds: float
    search_rate: float
    upsert_rate: float
    upsert_batch: int
    delete_rate: float
    delete_batch: int
    new_share: float
    seed: int
    share: Share
    queries: np.ndarray
    start_at: Any = field(default=None, repr=False)  # mp.Value: the wall time every client starts at


def _schedule(rng: np.random.Generator, seconds: float, rates: dict[str, float]) -> list[tuple[float, str]]:
    """Merged Poisson arrivals of each kind over `seconds`: (offset, kind), in time order."""
    events: list[tuple[float, str]] = []
    for kind, rate in rates.items():
        if rate > 0:
            times = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 1.5) + 20))
            events += [(float(t), kind) for t in times if t < seconds]
    return sorted(events)


def client_main(plan: Plan, ready: Any, out: Any) -> None:
    """Run one client's schedule; send (records, live ids with their expected text row, deleted ids, errors).

    Records are (scheduled wall time, kind, latency s). The garbage collector is frozen and off
    while the schedule runs (bench/service.py: its pauses were timed as server latency)."""
    from nestvec.client.remote import RemoteClient

    rng = np.random.default_rng(plan.seed * 1000 + plan.index)
    vectors = np.load(shared_data() / "minilm_base150k_fp16.npy", mmap_mode="r")
    share = plan.share
    live: dict[str, int] = dict(zip(share.base_ids, share.base_rows, strict=True))  # id -> row of its text
    live_keys = list(live)  # for O(1) random picks; deletions swap-remove
    slot = {key: i for i, key in enumerate(live_keys)}
    deleted: set[str] = set()
    fresh = list(zip(share.new_ids, share.new_rows, strict=True))
    rows_pool = share.base_rows + share.new_rows
    client = RemoteClient(plan.url, api_key=API_KEY, timeout_s=60.0)
    col = client.get_collection(COLLECTION)
    col.search(plan.queries[plan.index], k=10)  # warm the channel
    events = _schedule(rng, plan.seconds, {"search": plan.search_rate, "upsert": plan.upsert_rate,
                                           "delete": plan.delete_rate})
    records: list[tuple[float, str, float]] = []
    errors: list[str] = []
    ambiguous: set[str] = set()
    gc.collect()
    gc.freeze()
    gc.disable()
    ready.wait()  # every client is connected; the parent now sets the start time
    ready.wait()
    begin_wall = float(plan.start_at.value)
    begin = time.perf_counter() + (begin_wall - time.time())
    query = plan.index * 131

    def add_live(key: str, row: int) -> None:
        if key not in live:
            slot[key] = len(live_keys)
            live_keys.append(key)
        live[key] = row
        deleted.discard(key)

    def remove_live(key: str) -> None:
        i = slot.pop(key)
        last = live_keys.pop()
        if last != key:
            live_keys[i], slot[last] = last, i
        del live[key]
        deleted.add(key)

    for offset, kind in events:
        start = begin + offset
        while (wait := start - time.perf_counter()) > 0:
            time.sleep(wait)
        ids: list[str] = []
        try:
            if kind == "search":
                query = (query + 1) % len(plan.queries)
                col.search(plan.queries[query], k=10)
            elif kind == "upsert":
                rows: list[int] = []
                for _ in range(plan.upsert_batch):
                    if fresh and (rng.random() < plan.new_share or not live_keys):
                        key, row = fresh.pop()
                    elif live_keys:
                        key, row = live_keys[int(rng.integers(len(live_keys)))], int(rng.choice(rows_pool))
                    else:
                        continue
                    if key not in ids:
                        ids.append(key)
                        rows.append(row)
                if ids:
                    col.upsert(ids, texts=[share.texts[r] for r in rows],
                               vectors=np.asarray(vectors[rows], dtype=np.float32))
                    for key, row in zip(ids, rows, strict=True):
                        add_live(key, row)
            else:
                picks = {live_keys[int(rng.integers(len(live_keys)))] for _ in range(plan.delete_batch)} \
                    if live_keys else set()
                ids = sorted(picks)
                if ids:
                    col.delete(ids)
                    for key in ids:
                        remove_live(key)
        except Exception as err:  # every error counts; the ids it touched are in an unknown state
            errors.append(f"{kind}: {type(err).__name__}: {err}"[:300])
            ambiguous.update(ids)
        records.append((begin_wall + offset, kind, time.perf_counter() - start))
    gc.enable()
    client.close()
    out.put({"index": plan.index, "records": records, "live": live, "deleted": sorted(deleted),
             "errors": errors, "ambiguous": sorted(ambiguous)})


# -- the server's resources ------------------------------------------------------------------------
def process_sample(pid: int) -> tuple[float, int]:
    """(resident MB, open file descriptors) of a process, from /proc."""
    memory = memory_mb(pid)
    return memory["rss"], len(os.listdir(f"/proc/{pid}/fd"))


def memory_mb(pid: int) -> dict[str, float]:
    """Resident MB in all, anonymous (heap: what a leak grows) and file-backed (LMDB's mapped
    pages, which the kernel can drop and which grow with the data read), from /proc."""
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    out = dict.fromkeys(fields.values(), 0.0)
    with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
        for line in fh:
            name = line.split(maxsplit=1)[0] if line.strip() else ""
            if name in fields:
                out[fields[name]] = int(line.split()[1]) / 1024
    return out


def slope_per_minute(times_s: list[float], values: list[float]) -> float:
    """Least-squares slope of `values` against time, per minute (0 with fewer than two samples)."""
    if len(times_s) < 2 or max(times_s) - min(times_s) <= 0:
        return 0.0
    return float(np.polyfit(np.asarray(times_s) / 60.0, np.asarray(values, dtype=float), 1)[0])


class Sampler(threading.Thread):
    """Samples the server at start_at + k * interval (k = 0..n), then stops: memory, descriptors
    and (through `count`) the documents it holds, so memory growth can be read per document."""

    def __init__(self, pid: int, start_at: float, interval_s: float, samples: int,
                 count: Callable[[], int] | None = None) -> None:
        super().__init__(daemon=True)
        self.pid, self.start_at, self.interval_s, self.samples = pid, start_at, interval_s, samples
        self.count = count
        self.rows: list[tuple[float, float, int]] = []  # (seconds since start, MB, fds)
        self.details: list[dict[str, float]] = []  # anon / file MB and documents, per row

    def run(self) -> None:
        for k in range(self.samples):
            time.sleep(max(0.0, self.start_at + k * self.interval_s - time.time()))
            memory = memory_mb(self.pid)
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            self.rows.append((time.time() - self.start_at, memory["rss"], fds))
            docs = float(self.count()) if self.count is not None else float("nan")
            self.details.append({"anon_mb": round(memory["anon"], 1), "file_mb": round(memory["file"], 1),
                                 "docs": docs})


def _drain(stream: Any, sink: list[str]) -> None:
    """Read the server's stderr as it comes: a pipe left unread fills, and then the server blocks."""
    for line in iter(stream.readline, b""):
        sink.append(line.decode(errors="replace").rstrip())
        del sink[:-200]


def _collect(out: Any, procs: list[Any], deadline: float) -> list[JSONLike]:
    """Every client's result; raises (rather than hanging) when one died without sending it."""
    import queue

    parts: list[JSONLike] = []
    while len(parts) < len(procs):
        try:
            parts.append(out.get(timeout=1.0))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for proc in procs:
                    proc.kill()
                raise RuntimeError(f"{len(procs) - len(parts)} clients sent no result (exit codes {dead})") from None
    for proc in procs:
        proc.join(60)
    return parts


# -- the whole run ---------------------------------------------------------------------------------
def _percentiles(latencies: list[float]) -> tuple[float | None, float | None]:
    if not latencies:
        return None, None
    ms = np.asarray(latencies) * 1000
    return round(float(np.percentile(ms, 50)), 2), round(float(np.percentile(ms, 99)), 2)


def intervals(records: list[tuple[float, str, float]], start_at: float, interval_s: float,
              count: int) -> list[JSONLike]:
    """Per interval of scheduled start times: searches, rate, p50 / p99 of searches and of writes."""
    rows = []
    for i in range(count):
        lo, hi = start_at + i * interval_s, start_at + (i + 1) * interval_s
        inside = [r for r in records if lo <= r[0] < hi]
        search = [r[2] for r in inside if r[1] == "search"]
        write = [r[2] for r in inside if r[1] != "search"]
        s50, s99 = _percentiles(search)
        w50, w99 = _percentiles(write)
        rows.append({"interval": i, "searches": len(search), "search_rate": round(len(search) / interval_s, 1),
                     "search_p50_ms": s50, "search_p99_ms": s99, "writes": len(write), "write_p50_ms": w50,
                     "write_p99_ms": w99})
    return rows


def run(args: argparse.Namespace) -> JSONLike:
    from nestvec.client.remote import RemoteClient

    started = time.perf_counter()
    clients = args.clients
    count = max(1, round(args.minutes))
    seconds = count * args.interval_s
    per_client_new = int(np.ceil(args.upsert_rate / clients * seconds * args.upsert_batch * args.new_share * 1.5)) + 20
    vectors_all = np.load(shared_data() / "minilm_base150k_fp16.npy", mmap_mode="r")
    per_client_new = min(per_client_new, (len(vectors_all) - args.docs) // clients)
    total_rows = args.docs + clients * per_client_new
    ids, texts = load_passages(total_rows)
    queries = np.load(shared_data() / "minilm_queries_fp16.npy").astype(np.float32)
    failures: list[str] = []
    result: JSONLike = {"clients": clients, "docs": args.docs, "interval_s": args.interval_s, "intervals": count,
                        "offered": {"search_per_s": args.search_rate, "upsert_calls_per_s": args.upsert_rate,
                                    "upsert_batch": args.upsert_batch, "delete_calls_per_s": args.delete_rate,
                                    "delete_batch": args.delete_batch}}
    with tempfile.TemporaryDirectory(prefix="nestvec-soak-") as data:
        port = free_port()
        server = start_server(Path(data), port)
        log: list[str] = []
        threading.Thread(target=_drain, args=(server.stderr, log), daemon=True).start()
        url = f"grpc://127.0.0.1:{port}"
        try:
            admin = RemoteClient(url, api_key=API_KEY, timeout_s=600.0)
            col = admin.create_collection(COLLECTION, encoder=None, dim=384, index=args.index)
            load_started = time.perf_counter()
            for lo in range(0, args.docs, 2000):
                hi = min(lo + 2000, args.docs)
                col.upsert(ids[lo:hi], texts=texts[lo:hi], vectors=np.asarray(vectors_all[lo:hi], dtype=np.float32))
            result["load_s"] = round(time.perf_counter() - load_started, 1)
            result["index"] = col.info().get("index", {}).get("kind")

            ctx = mp.get_context("spawn")
            ready, out = ctx.Barrier(clients + 1), ctx.Queue()
            start_at = ctx.Value("d", 0.0)
            procs = []
            for c in range(clients):
                base_rows = list(range(c, args.docs, clients))
                new_rows = list(range(args.docs + c * per_client_new, args.docs + (c + 1) * per_client_new))
                share = Share([ids[r] for r in base_rows], base_rows, [ids[r] for r in new_rows], new_rows,
                              {r: texts[r] for r in base_rows + new_rows})
                plan = Plan(url, c, seconds, args.search_rate / clients, args.upsert_rate / clients,
                            args.upsert_batch, args.delete_rate / clients, args.delete_batch, args.new_share,
                            args.seed, share, queries, start_at)
                procs.append(ctx.Process(target=client_main, args=(plan, ready, out)))
            for proc in procs:
                proc.start()
            ready.wait(timeout=180)  # all clients connected and warmed
            rss0, fds0 = process_sample(server.pid)
            start_at.value = time.time() + 1.0
            ready.wait(timeout=60)
            sampler = Sampler(server.pid, start_at.value, args.interval_s, count + 1, col.count)
            sampler.start()
            parts = _collect(out, procs, time.monotonic() + seconds + 300)
            sampler.join(args.interval_s + 30)
            result["before_load"] = {"rss_mb": round(rss0, 1), "fds": fds0}

            records = [r for p in parts for r in p["records"]]
            errors = [e for p in parts for e in p["errors"]]
            rows = intervals(records, start_at.value, args.interval_s, count)
            samples = sampler.rows
            for row, (_, rss, fds) in zip(rows, samples[1:], strict=False):  # the sample at each interval's end
                row["rss_mb"], row["fds"] = round(rss, 1), fds
            result["interval_rows"] = rows
            result["samples"] = [{"t_s": round(t, 1), "rss_mb": round(m, 1), "fds": f, **d}
                                 for (t, m, f), d in zip(samples, sampler.details, strict=True)]
            times = [t for t, _, _ in samples]
            result["rss_mb_per_min"] = round(slope_per_minute(times, [m for _, m, _ in samples]), 2)
            for part in ("anon", "file"):
                result[f"{part}_mb_per_min"] = round(slope_per_minute(times, [d[f"{part}_mb"]
                                                                              for d in sampler.details]), 2)
            docs = [d["docs"] for d in sampler.details]
            if len(docs) >= 2 and docs[-1] != docs[0]:  # the writes grow the collection: memory per 1,000 documents
                growth = (sampler.details[-1]["anon_mb"] - sampler.details[0]["anon_mb"]) / (docs[-1] - docs[0])
                result["docs_added"] = int(docs[-1] - docs[0])
                result["anon_mb_per_1k_docs_added"] = round(1000 * growth, 2)
            result["fds_per_min"] = round(slope_per_minute(times, [f for _, _, f in samples]), 3)
            result["errors"] = len(errors)
            result["error_examples"] = errors[:5]
            search_lat = [r[2] for r in records if r[1] == "search"]
            write_lat = [r[2] for r in records if r[1] != "search"]
            result["search_p50_ms"], result["search_p99_ms"] = _percentiles(search_lat)
            result["write_p50_ms"], result["write_p99_ms"] = _percentiles(write_lat)
            result["searches"] = len(search_lat)
            result["writes"] = len(write_lat)
            result["search_rate"] = round(len(search_lat) / seconds, 1)
            if errors:
                failures.append(f"{len(errors)} errors, e.g. {errors[:3]}")
            if len(samples) < 2:
                failures.append(f"only {len(samples)} server samples")
            elif samples[-1][2] > samples[0][2] + FD_MARGIN:
                failures.append(f"open descriptors grew from {samples[0][2]} to {samples[-1][2]}")

            # The acknowledged writes say what the collection holds: every share's live ids, no others.
            ambiguous = {a for p in parts for a in p["ambiguous"]}
            expected = sum(len(p["live"]) for p in parts)
            got = col.count()
            result["count"], result["expected_count"] = got, expected
            if ambiguous:
                failures.append(f"{len(ambiguous)} ids in an unknown state (their write failed): count not checked")
            elif got != expected:
                failures.append(f"count {got} != {expected} implied by the acknowledged writes")
            wrong = 0
            rng = np.random.default_rng(args.seed)
            for p in parts:
                live = sorted(set(p["live"]) - ambiguous)
                pick = [live[i] for i in rng.choice(len(live), min(CONTENT_SAMPLE, len(live)), replace=False)]
                gone = [d for d in p["deleted"] if d not in ambiguous][:CONTENT_SAMPLE]
                for key, record in zip(pick, col.get(pick), strict=True):
                    wrong += record is None or record.text != texts[p["live"][key]]
                wrong += sum(record is not None for record in col.get(gone))
            result["content_mismatches"] = wrong
            if wrong:
                failures.append(f"{wrong} sampled documents differ from the acknowledged writes")
            stats = admin.stats()
            result["server_stats"] = [m for m in stats if m["calls"] and m["method"].rsplit("/", 1)[-1]
                                      in ("Search", "Upsert", "Delete")]
            server_errors = sum(int(m["errors"]) for m in stats)
            result["server_errors"] = server_errors
            if server_errors:
                failures.append(f"the server counted {server_errors} failed calls")
            admin.close()
        finally:
            server.terminate()
            result["server_exit"] = server.wait(60)
    if result.get("server_exit") not in (0, None):
        failures.append(f"the server exited with {result['server_exit']}")
    result["server_log_tail"] = log[-10:]
    result["failures"] = failures
    result["passed"] = not failures
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def plot(result: JSONLike, ax: Any) -> None:
    """Search p50 / p99 per interval, and the server's RSS on a twin axis."""
    rows = result.get("interval_rows", [])
    x = [r["interval"] + 1 for r in rows]
    ax.plot(x, [r["search_p50_ms"] for r in rows], "o-", label="search p50")
    ax.plot(x, [r["search_p99_ms"] for r in rows], "s-", label="search p99")
    ax.set_xlabel(f"interval ({result.get('interval_s', 60):g} s)")
    ax.set_ylabel("ms")
    ax.legend(loc="upper left", fontsize=8)
    twin = ax.twinx()
    samples = result.get("samples", [])[1:]  # the sample at each interval's end
    if samples and "anon_mb" in samples[0]:
        twin.plot(x, [s["anon_mb"] for s in samples][:len(x)], "^--", color="gray",
                  label=f"server anonymous MB ({result.get('anon_mb_per_min', 0):+.1f}/min)")
        twin.plot(x, [s["file_mb"] for s in samples][:len(x)], "v:", color="tab:green",
                  label=f"server file-backed MB ({result.get('file_mb_per_min', 0):+.1f}/min)")
        twin.set_ylabel("server resident MB")
    else:
        twin.plot(x, [r.get("rss_mb") for r in rows], "^--", color="gray", label="server RSS")
        twin.set_ylabel(f"server RSS MB ({result.get('rss_mb_per_min', 0):+.1f} MB/min)")
    twin.legend(loc="upper right", fontsize=8)
