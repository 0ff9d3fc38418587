"""Crash consistency: SIGKILL a live mixed workload at a random moment, reopen, check every promise.

A child process runs a seeded random workload against one collection (SPANN index, lexical index,
SciFact texts and MiniLM vectors): upserts (new ids and overwrites), deletes, dense / lexical /
hybrid searches, index flushes that split posting lists, deletes enough to purge and merge them,
and in some trials a codec switch (what `nestvec plan --apply` runs). It logs "begin i" before
operation i and "ack i" once it returned. The parent kills it, reopens the collection and checks:
every acknowledged upsert is there with its latest text, metadata and vector code; every
acknowledged delete is gone from get, count and dense, lexical and hybrid search; no id twice;
recall@10 against brute force over the surviving vectors is within 0.01 of a fresh build's. The
one operation in flight at the kill may have landed or not, but whole or not at all.

Trials chain on one folder (each reopens what the last crash left, as a restarted server would),
so a trial also kills recovery work. Operation i of a trial is a pure function of (seed, i), so the
parent knows exactly what each acknowledged operation wrote; the kill moment is random, so a
failing chain replays with the same --seed and --trials but not always at the same instant.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.tortures import REPO, scifact_folder
from nestvec.checks import check_vectors

NAME = "crash"
COLLECTION = "torture"
RECODE_SPECS = ("fp16", "int8", "fp8")
SEARCH_MODES = ("dense", "lexical", "hybrid")
RECALL_QUERIES = 1000
RECALL_TOLERANCE = 0.01
EARLY_KILL_SHARE = 0.2  # trials killed at a random moment after start, open and recovery included
AIMED_KILL_SHARE = 0.5  # of the trials with a codec switch: killed within 0.6 s of its start
DELETED_PROBES = 30  # deleted ids looked for in every search mode after each crash
JSONLike = dict[str, Any]


# -- the data: SciFact texts and shipped MiniLM vectors -------------------------------------------
@dataclass
class Pool:
    """The first `size` SciFact documents: what every operation draws its texts and vectors from."""

    texts: list[str]
    vectors: np.ndarray
    queries: np.ndarray

    @classmethod
    def load(cls, size: int) -> Pool:
        folder = scifact_folder()
        by_id: dict[str, str] = {}
        with (folder / "corpus.jsonl").open(encoding="utf-8") as fh:
            for line in fh:
                doc = json.loads(line)
                by_id[doc["_id"]] = f"{doc.get('title', '')} {doc.get('text', '')}"[:600]
        ids = (folder / "minilm" / "corpus_ids.txt").read_text().split()[:size]
        vectors = np.load(folder / "minilm" / "corpus.npy", mmap_mode="r")[:size].astype(np.float32)
        queries = np.load(folder / "minilm" / "queries.npy", mmap_mode="r")[:RECALL_QUERIES].astype(np.float32)
        return cls([by_id[i] for i in ids], vectors, queries)


# -- the workload: operation i of a trial is a pure function of (seed, i) ------------------------
@dataclass(frozen=True)
class Operation:
    index: int
    kind: str  # upsert | delete | search | flush | recode
    ids: tuple[str, ...] = ()
    mode: str = ""
    spec: str = ""


def _key(j: int) -> str:
    return f"doc-{j}"


def operation(seed: int, i: int, pool_size: int, recode_at: int | None, first_trial: bool) -> Operation:
    if first_trial and i == 0:  # enough to fit the codec and build the SPANN index early
        return Operation(0, "upsert", tuple(_key(j) for j in range(min(1100, pool_size))))
    if i == recode_at:
        return Operation(i, "recode", spec=RECODE_SPECS[seed % len(RECODE_SPECS)])
    rng = np.random.default_rng([seed, i])
    roll = rng.random()
    if roll < 0.55:
        picks = rng.choice(pool_size, int(rng.integers(1, 49)), replace=False)
        return Operation(i, "upsert", tuple(_key(int(j)) for j in picks))
    if roll < 0.78:
        picks = rng.choice(pool_size, int(rng.integers(1, 33)), replace=False)
        return Operation(i, "delete", tuple(_key(int(j)) for j in picks))
    if roll < 0.95:
        return Operation(i, "search", ids=(_key(int(rng.integers(pool_size))),),
                         mode=SEARCH_MODES[int(rng.integers(len(SEARCH_MODES)))])
    return Operation(i, "flush")


def written(pool: Pool, seed: int, op: Operation) -> tuple[list[str], np.ndarray, list[JSONLike]]:
    """The texts, vectors and metadata an upsert writes: each id's document, tagged with the
    operation, and its vector moved a little toward another document's (so overwrites differ)."""
    rng = np.random.default_rng([seed, op.index, 7])
    rows = np.array([int(k.split("-")[1]) for k in op.ids])
    others = rng.integers(len(pool.vectors), size=len(rows))
    weights = rng.uniform(0.0, 0.5, size=(len(rows), 1)).astype(np.float32)
    vectors = check_vectors(pool.vectors[rows] + weights * pool.vectors[others], pool.vectors.shape[1], "vectors")
    texts = [f"{pool.texts[r]} [seed {seed} op {op.index}]" for r in rows.tolist()]
    metadata: list[JSONLike] = [{"seed": seed, "op": op.index, "group": int(r % 7)} for r in rows.tolist()]
    return texts, vectors, metadata


# -- the child ------------------------------------------------------------------------------------
def _count_rebalancing(log: int) -> None:
    """Log each posting-list split and merge the index makes (to show the workload reached them)."""
    from nestvec.index.spann import SpannIndex

    split, rebalance = SpannIndex._split_oversized, SpannIndex._rebalance_lists

    def counted_split(self: Any, lists: Any, centroids: Any) -> Any:
        updates = split(self, lists, centroids)
        if updates:
            os.write(log, f"event split {len(updates) // 2}\n".encode())
        return updates

    def counted_rebalance(self: Any, txn: Any, lists: Any, centroids: Any, mergeable: Any) -> Any:
        before = len(np.flatnonzero(centroids.active))
        updated = rebalance(self, txn, lists, centroids, mergeable)
        merged = before - len(np.flatnonzero(updated.active))
        if merged > 0:
            os.write(log, f"event merge {merged}\n".encode())
        return updated

    SpannIndex._split_oversized = counted_split  # type: ignore[method-assign]
    SpannIndex._rebalance_lists = counted_rebalance  # type: ignore[method-assign]


@contextlib.contextmanager
def small_lists(posting_limit: int, flush_rows: int | None = None) -> Iterator[None]:
    """Shorter posting lists (and an earlier flush) than the defaults, so a few thousand vectors
    split and merge lists as often as millions would. The index saves its config, so a reopened
    collection keeps them; the fresh build it is compared with is made under the same setting."""
    import nestvec.collection
    from nestvec.index.spann import SpannConfig

    saved = nestvec.collection.SpannConfig, nestvec.collection.FLUSH_ROWS
    nestvec.collection.SpannConfig = functools.partial(SpannConfig, posting_limit=posting_limit)  # type: ignore[misc]
    if flush_rows is not None:
        nestvec.collection.FLUSH_ROWS = flush_rows
    try:
        yield
    finally:
        nestvec.collection.SpannConfig, nestvec.collection.FLUSH_ROWS = saved  # type: ignore[misc]


def child(args: argparse.Namespace) -> None:

    with small_lists(args.posting_limit, args.flush_rows):
        _workload(args)


def _workload(args: argparse.Namespace) -> None:
    import nestvec

    log = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _count_rebalancing(log)
    pool = Pool.load(args.pool)
    catalog = nestvec.connect(args.folder)
    if COLLECTION in catalog.list_collections():
        collection = catalog.get_collection(COLLECTION)
    else:
        collection = catalog.create_collection(COLLECTION, encoder=None, dim=pool.vectors.shape[1], codec="int8",
                                               index="spann")
    os.write(log, b"ready\n")
    for i in range(args.max_ops):
        op = operation(args.seed, i, args.pool, args.recode_at, args.first)
        os.write(log, f"begin {i}\n".encode())
        if op.kind == "upsert":
            texts, vectors, metadata = written(pool, args.seed, op)
            collection.upsert(list(op.ids), texts=texts, vectors=vectors, metadata=metadata)
        elif op.kind == "delete":
            collection.delete(list(op.ids))
        elif op.kind == "search":
            row = int(op.ids[0].split("-")[1])
            hits = collection.search(pool.texts[row] if op.mode != "dense" else pool.vectors[row], k=10,
                                     mode=op.mode, vector=pool.vectors[row] if op.mode == "hybrid" else None)
            if len({h.id for h in hits}) != len(hits):
                os.write(log, f"error duplicate ids in a {op.mode} search\n".encode())
        elif op.kind == "flush":
            collection.flush_index()
        elif op.kind == "recode":
            collection.recode(op.spec, progress=False)
        os.write(log, f"ack {i}\n".encode())
    os.write(log, b"done\n")


# -- the parent's model of what must be there ------------------------------------------------------
@dataclass
class Expected:
    """What the collection must hold: each live id's text, metadata and vector; every deleted id
    with its last vector and text (to look for it in searches)."""

    live: dict[str, tuple[str, JSONLike, np.ndarray]] = field(default_factory=dict)
    deleted: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)
    recoded: set[str] = field(default_factory=set)  # ids whose codes a codec switch re-derived from codes

    def apply(self, pool: Pool, seed: int, op: Operation) -> None:
        if op.kind == "upsert":
            texts, vectors, metadata = written(pool, seed, op)
            for key, text, vector, meta in zip(op.ids, texts, vectors, metadata, strict=True):
                self.live[key] = (text, meta, vector)
                self.deleted.pop(key, None)
                self.recoded.discard(key)
        elif op.kind == "delete":
            for key in op.ids:
                if key in self.live:
                    text, _, vector = self.live.pop(key)
                    self.deleted[key] = (text, vector)
                    self.recoded.discard(key)
        elif op.kind == "recode":
            self.recoded = set(self.live)

    def landed(self, collection: Any, seed: int, op: Operation) -> bool:
        """Whether the operation in flight at the kill committed, judged on its first affected id
        (`check` then holds every other id to the same answer: a batch lands whole or not at all)."""
        if op.kind == "upsert":
            record = collection.get([op.ids[0]])[0]
            return record is not None and (record.metadata.get("seed"), record.metadata.get("op")) == (seed, op.index)
        if op.kind == "delete":
            present = [k for k in op.ids if k in self.live]
            return bool(present) and collection.get([present[0]])[0] is None
        if op.kind == "recode":
            return bool(collection.codec.spec == op.spec)
        return False


@dataclass
class Log:
    ready: bool
    acked: list[int]
    in_flight: int | None
    done: bool
    splits: int
    merges: int
    errors: list[str]

    @classmethod
    def read(cls, path: Path) -> Log:
        lines = path.read_text().splitlines() if path.exists() else []
        acked = [int(line.split()[1]) for line in lines if line.startswith("ack ")]
        begun = [int(line.split()[1]) for line in lines if line.startswith("begin ")]
        in_flight = begun[-1] if begun and (not acked or acked[-1] != begun[-1]) else None
        events = [line.split() for line in lines if line.startswith("event ")]
        return cls("ready" in lines, acked, in_flight, "done" in lines,
                   sum(int(e[2]) for e in events if e[1] == "split"),
                   sum(int(e[2]) for e in events if e[1] == "merge"),
                   [line for line in lines if line.startswith("error ")])


# -- checks after a crash ---------------------------------------------------------------------------
def recall_at_10(collection: Any, queries: np.ndarray, truth: list[set[str]]) -> float:
    found = collection.search_batch(queries, k=10)
    return float(np.mean([len({h.id for h in hits} & want) / max(len(want), 1)
                          for hits, want in zip(found, truth, strict=True)]))


def check(collection: Any, expected: Expected, pool: Pool, scratch: Path) -> tuple[list[str], JSONLike]:
    """Every promise against the reopened collection; returns (failures, figures)."""
    failures: list[str] = []
    keys = sorted(expected.live)
    if collection.count() != len(keys):
        failures.append(f"count {collection.count()} != {len(keys)} acknowledged live ids")
    stored_ids = collection.ids()
    if len(stored_ids) != len(set(stored_ids)) or set(stored_ids) != set(keys):
        extra, missing = set(stored_ids) - set(keys), set(keys) - set(stored_ids)
        failures.append(f"ids differ: {len(extra)} unexpected (e.g. {sorted(extra)[:3]}), "
                        f"{len(missing)} missing (e.g. {sorted(missing)[:3]})")
    records = collection.get(keys) if keys else []
    wrong = [k for k, r in zip(keys, records, strict=True)
             if r is None or r.text != expected.live[k][0] or r.metadata != expected.live[k][1]]
    if wrong:
        failures.append(f"{len(wrong)} acknowledged upserts missing or stale (e.g. {wrong[:3]})")
    codec = collection.scan_codec
    present = set(stored_ids)
    exact = [k for k in keys if k not in expected.recoded and k in present]
    if exact:
        stored = collection.store.get_codes([k.encode() for k in exact], codec.bytes_per_vector, bulk=False)
        # what the collection stores of a given vector: the vector as its input check normalises it
        want = codec.encode(check_vectors(np.stack([expected.live[k][2] for k in exact]), codec.dim, "vectors"))
        bad = np.flatnonzero((stored != want).any(axis=1))
        if len(bad):
            failures.append(f"{len(bad)} stored vector codes differ from their latest upsert (e.g. {exact[bad[0]]})")
    recoded = sorted(expected.recoded & set(keys) & present)
    if recoded:  # re-derived from the old codes by a codec switch: close, not equal
        got = collection.stored_vectors(recoded)
        cosine = np.array([float(got[k] @ expected.live[k][2] / (np.linalg.norm(got[k]) + 1e-12)) for k in recoded])
        if (cosine < 0.97).any():
            failures.append(f"{int((cosine < 0.97).sum())} recoded vectors drifted (min cosine {cosine.min():.3f})")
    probes = sorted(expected.deleted)[:: max(1, len(expected.deleted) // DELETED_PROBES)][:DELETED_PROBES]
    if probes:
        if any(r is not None for r in collection.get(probes)):
            failures.append("a deleted id came back in get")
        vectors = np.stack([expected.deleted[k][1] for k in probes])
        texts = [expected.deleted[k][0] for k in probes]
        runs = {"dense": collection.search_batch(vectors, k=10),
                "lexical": collection.search_batch(texts, k=10, mode="lexical"),
                "hybrid": collection.search_batch(texts, k=10, mode="hybrid", vectors=vectors)}
        for mode, results in runs.items():
            back = [k for k, hits in zip(probes, results, strict=True) if k in {h.id for h in hits}]
            if back:
                failures.append(f"deleted ids came back in {mode} search: {back[:3]}")
            if any(len({h.id for h in hits}) != len(hits) for hits in results):
                failures.append(f"an id appears twice in one {mode} result")
            strays = {h.id for hits in results for h in hits} - set(keys)
            if strays:
                failures.append(f"{mode} search returned ids that are not stored: {sorted(strays)[:3]}")
    figures: JSONLike = {"live": len(keys), "deleted": len(expected.deleted), "codec": collection.codec.spec,
                         "index": collection.info()["index"].get("kind")}
    if len(keys) >= 50:
        figures.update(compare_recall(collection, expected, pool, scratch))
        if figures["recall_reopened"] < figures["recall_fresh"] - RECALL_TOLERANCE:
            failures.append(f"recall@10 {figures['recall_reopened']:.4f} after the crash vs "
                            f"{figures['recall_fresh']:.4f} for a fresh build")
    return failures, figures


def compare_recall(collection: Any, expected: Expected, pool: Pool, scratch: Path) -> JSONLike:
    """recall@10 of the reopened collection and of a fresh index over the same vectors, coded by
    the same fitted codec, both against exact search over the surviving float vectors."""
    import faiss

    import nestvec

    keys = sorted(expected.live)
    base = np.stack([expected.live[k][2] for k in keys])
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    _, rows = exact.search(pool.queries, 10)
    truth = [{keys[r] for r in row if r >= 0} for row in rows.tolist()]
    folder = Path(tempfile.mkdtemp(dir=scratch))
    fresh = nestvec.connect(folder).create_collection("fresh", encoder=None, dim=base.shape[1],
                                                      codec=collection.codec.spec,
                                                      index=collection.config.index)
    fresh.auto_fit = False
    fresh.upsert(keys, vectors=base)
    if fresh.staged:  # the same fitted codec (when it has parameters): only the index structure differs
        fresh.adopt_codec(collection.codec)
    fresh.flush_index()
    out = {"recall_reopened": round(recall_at_10(collection, pool.queries, truth), 4),
           "recall_fresh": round(recall_at_10(fresh, pool.queries, truth), 4)}
    fresh.close()
    return out


# -- the parent ------------------------------------------------------------------------------------
def _run_child(folder: Path, log: Path, seed: int, trial_args: JSONLike, kill_after_s: float, early: bool,
               aim_at: int | None = None, ready_timeout_s: float = 120.0) -> tuple[bool, float]:
    """Start the workload, let it run `kill_after_s` past "ready" (past its start when `early`:
    the kill may then land in the open and its recovery; past the start of operation `aim_at`
    when given), SIGKILL it; (killed, run seconds)."""
    command = [sys.executable, "-m", "bench.tortures.crash", "--child", "--folder", str(folder), "--log", str(log),
               "--seed", str(seed)] + [f"--{k.replace('_', '-')}={v}" for k, v in trial_args.items()]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + ready_timeout_s
    while not early and not Log.read(log).ready:
        if proc.poll() is not None:
            raise RuntimeError(f"workload seed {seed} exited before ready: {proc.stderr.read().decode()[-2000:]}"
                               if proc.stderr else "workload exited")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"workload seed {seed} not ready in {ready_timeout_s} s")
        time.sleep(0.02)
    marker = f"begin {aim_at}\n"
    while aim_at is not None and proc.poll() is None and marker not in (log.read_text() if log.exists() else ""):
        if time.monotonic() > deadline:
            break
        time.sleep(0.005)
    started = time.monotonic()
    try:
        proc.wait(timeout=kill_after_s)
        killed = False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = True
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"workload seed {seed} failed (rc {proc.returncode}): "
                           f"{proc.stderr.read().decode()[-3000:] if proc.stderr else ''}")
    return killed, time.monotonic() - started


def trials(base_seed: int, count: int, pool_size: int, max_run_s: float, flush_rows: int, posting_limit: int,
           recode_share: float, folder: Path) -> Iterator[JSONLike]:
    """Run `count` chained crash trials on `folder`, yielding each trial's report."""
    import nestvec

    pool = Pool.load(pool_size)
    expected = Expected()
    rng = np.random.default_rng(base_seed)
    for trial in range(count):
        seed = base_seed * 1000 + trial
        recode_at = int(rng.integers(2, 40)) if trial > 0 and rng.random() < recode_share else None
        early = bool(trial > 0 and rng.random() < EARLY_KILL_SHARE)
        kill_after = float(rng.uniform(0.3, 2.5) if early else rng.uniform(0.05, max_run_s))
        aim_at = None
        if recode_at is not None and not early and rng.random() < AIMED_KILL_SHARE:  # inside the codec switch
            aim_at, kill_after = recode_at, float(rng.uniform(0.0, 0.6))
        log = folder.parent / f"ops-{seed}.log"
        log.unlink(missing_ok=True)
        trial_args: JSONLike = {"pool": pool_size, "flush_rows": flush_rows, "posting_limit": posting_limit,
                                "max_ops": 100_000,
                                "first": int(trial == 0)}
        if recode_at is not None:
            trial_args["recode_at"] = recode_at
        killed, ran = _run_child(folder, log, seed, trial_args, kill_after, early, aim_at)
        record = Log.read(log)
        ops = {i: operation(seed, i, pool_size, recode_at, trial == 0) for i in [*record.acked,
                                                                                   *([record.in_flight] if
                                                                                     record.in_flight is not None
                                                                                     else [])]}
        for i in record.acked:
            expected.apply(pool, seed, ops[i])
        started = time.perf_counter()
        catalog = nestvec.connect(folder / "store")
        collection = catalog.get_collection(COLLECTION) if COLLECTION in catalog.list_collections() else None
        reopen_s = time.perf_counter() - started
        failures = list(record.errors)
        if collection is None and (record.acked or expected.live):
            failures.append("the collection is gone after acknowledged writes")
        in_flight = ops.get(record.in_flight) if record.in_flight is not None else None
        landed = False
        if collection is not None and in_flight is not None and in_flight.kind in ("upsert", "delete", "recode"):
            landed = expected.landed(collection, seed, in_flight)
            if landed:
                expected.apply(pool, seed, in_flight)
        switched = recode_at is not None and (recode_at in record.acked or (landed and in_flight is not None
                                                                            and in_flight.kind == "recode"))
        figures: JSONLike = {}
        if collection is not None:
            with small_lists(posting_limit):  # for the fresh build compared with
                found, figures = check(collection, expected, pool, folder.parent)
            failures += found
        catalog.close()
        report = {"trial": trial, "seed": seed, "killed": killed, "early_kill": early,
                  "aimed_at_codec_switch": aim_at is not None, "ran_s": round(ran, 2),
                  "acked_ops": len(record.acked), "in_flight": in_flight.kind if in_flight else None,
                  "in_flight_landed": landed, "recode_at": recode_at,
                  "codec_switched": switched, "splits": record.splits,
                  "merges": record.merges, "reopen_s": round(reopen_s, 2), **figures,
                  "failures": failures, "passed": not failures}
        yield report


def run(args: argparse.Namespace) -> JSONLike:
    started = time.perf_counter()
    reports: list[JSONLike] = []
    with tempfile.TemporaryDirectory(prefix="nestvec-crash-") as tmp:
        folder = Path(tmp) / "store-root"
        folder.mkdir()
        for report in trials(args.seed, args.trials, args.pool, args.max_run_s, args.flush_rows,
                             args.posting_limit, args.recode_share, folder):
            reports.append(report)
            status = "ok" if report["passed"] else "FAILED " + "; ".join(report["failures"])
            print(f"crash trial {report['trial']} seed {report['seed']}: {report['acked_ops']} ops acked, "
                  f"in flight {report['in_flight']} (landed {report['in_flight_landed']}), "
                  f"live {report.get('live')}, recall {report.get('recall_reopened')} vs fresh "
                  f"{report.get('recall_fresh')}: {status}", flush=True)
    failed = [r for r in reports if not r["passed"]]
    return {"passed": not failed, "seconds": round(time.perf_counter() - started, 1), "seed": args.seed,
            "trials": len(reports), "trials_passed": len(reports) - len(failed),
            "killed_mid_run": sum(r["killed"] for r in reports),
            "acked_ops": sum(r["acked_ops"] for r in reports),
            "in_flight_landed": sum(r["in_flight_landed"] for r in reports),
            "codec_switches_tried": sum(r["recode_at"] is not None for r in reports),
            "codec_switches_committed": sum(r["codec_switched"] for r in reports),
            "kills_in_a_codec_switch": sum(r["in_flight"] == "recode" for r in reports),
            "splits": sum(r["splits"] for r in reports), "merges": sum(r["merges"] for r in reports),
            "replay": f"python bench/torture.py crash --seed {args.seed} --trials {args.trials} --pool {args.pool} "
                      f"--posting-limit {args.posting_limit} --flush-rows {args.flush_rows}",
            "failed_seeds": [r["seed"] for r in failed], "reports": reports}


def plot(result: JSONLike, ax: Any) -> None:
    reports = result["reports"]
    trial = [r["trial"] for r in reports]
    ax.bar(trial, [r["acked_ops"] for r in reports], color=["tab:green" if r["passed"] else "tab:red"
                                                            for r in reports], label="acknowledged ops")
    ax.set_xlabel("trial (SIGKILL at a random moment, then reopen)")
    ax.set_ylabel("operations acknowledged before the kill")
    twin = ax.twinx()
    twin.plot(trial, [r.get("recall_reopened") for r in reports], "o-", color="tab:blue", label="recall@10 reopened")
    twin.plot(trial, [r.get("recall_fresh") for r in reports], "x--", color="tab:gray", label="recall@10 fresh build")
    twin.set_ylabel("recall@10")
    twin.legend(loc="lower right", fontsize=8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pool", type=int, default=3000, help="SciFact documents the workload draws from")
    parser.add_argument("--max-run-s", type=float, default=8.0, help="longest a workload runs before the kill")
    parser.add_argument("--flush-rows", type=int, default=128, help="write buffer size before a flush")
    parser.add_argument("--posting-limit", type=int, default=32, help="posting list size the index aims at")
    parser.add_argument("--recode-share", type=float, default=0.3, help="share of trials that switch codecs")


def main() -> None:
    parser = argparse.ArgumentParser(description="the crash workload (child side)")
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--pool", type=int, required=True)
    parser.add_argument("--flush-rows", type=int, default=256)
    parser.add_argument("--posting-limit", type=int, default=64)
    parser.add_argument("--max-ops", type=int, default=100_000)
    parser.add_argument("--recode-at", type=int, default=None)
    parser.add_argument("--first", type=int, default=0)
    args = parser.parse_args()
    args.first = bool(args.first)
    args.folder = args.folder / "store"
    child(args)


if __name__ == "__main__":
    main()
