"""Disk full: a collection is written until its disk is full, then held to every promise.

The space runs out for real on a small tmpfs this part mounts (with a ballast file on it, deleted
to free space), or, where mounting is not allowed, at the collection's storage limit
(`max_disk_bytes` / `nestvec serve --max-disk-mb`, raised to free space); the result says which.
Each run goes twice: embedded, in a child process (a crash shows as its exit signal; before the
fix LMDB's writes through its map died of SIGBUS on a full tmpfs), and over gRPC to a
`nestvec serve` process. SciFact texts with their shipped MiniLM vectors, an encoder-less
collection (SPANN embedded, flat over gRPC). Checked:

- the write that finds no room raises ResourceExhaustedError (RESOURCE_EXHAUSTED on the wire, the
  status read from a raw stub) and the process lives on;
- it changed nothing: count, every acknowledged text, dense and lexical search are what they were
  (an overwrite of stored documents that fails too leaves the old texts and vectors searchable);
- creating a collection on the full disk fails the same way and leaves no folder (tmpfs only);
- once space is freed the same batch and more after it are written, and lexical search has
  caught up with anything it missed;
- a fresh process reopening the folder finds exactly the acknowledged documents.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench.tortures import REPO, scifact_folder

NAME = "disk"
COLLECTION = "full"
SAMPLE = 30  # documents whose dense and lexical results are compared before / after
MB = 1 << 20
JSONLike = dict[str, Any]
Model = dict[str, tuple[str, int]]  # acknowledged id -> (text, corpus row of its vector)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("auto", "tmpfs", "cap"), default="auto",
                        help="auto: a tmpfs where mount works, else the storage limit")
    parser.add_argument("--transports", default="embedded,grpc")
    parser.add_argument("--tmpfs-mb", type=int, default=24, help="size of the tmpfs")
    parser.add_argument("--ballast-mb", type=int, default=16, help="file on the tmpfs deleted to free space")
    parser.add_argument("--cap-mb", type=int, default=4, help="max_disk_bytes while full (cap mode)")
    parser.add_argument("--freed-cap-mb", type=int, default=64, help="max_disk_bytes after freeing (cap mode)")
    parser.add_argument("--batch", type=int, default=96, help="documents per upsert")
    parser.add_argument("--after", type=int, default=4, help="batches written after space is freed")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="per child process")


# -- data ------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """SciFact in corpus order: ids, title + text, shipped MiniLM vectors."""

    ids: list[str]
    texts: list[str]
    vectors: np.ndarray

    @classmethod
    def load(cls) -> Corpus:
        folder = scifact_folder()
        by_id: dict[str, str] = {}
        with (folder / "corpus.jsonl").open(encoding="utf-8") as fh:
            for line in fh:
                doc = json.loads(line)
                by_id[doc["_id"]] = f"{doc.get('title', '')} {doc.get('text', '')}".strip()
        ids = (folder / "minilm" / "corpus_ids.txt").read_text().split()
        vectors = np.load(folder / "minilm" / "corpus.npy").astype(np.float32)
        return cls(ids, [by_id[i] for i in ids], vectors)


def _sample(model: Model) -> list[str]:
    ids = sorted(model)
    return ids[:: max(1, len(ids) // SAMPLE)][:SAMPLE]


def snapshot(handle: Any, model: Model, corpus: Corpus, sample: list[str]) -> JSONLike:
    """What a reader sees: count, every acknowledged text, dense and lexical top-5 of a sample."""
    ids = sorted(model)
    records = handle.get(ids) if ids else []
    wrong = [i for i, r in zip(ids, records, strict=True) if r is None or r.text != model[i][0]]
    dense = [[h.id for h in handle.search(corpus.vectors[model[i][1]], k=5)] for i in sample if i in model]
    lexical = [[h.id for h in handle.search(model[i][0][:300], k=5, mode="lexical")] for i in sample if i in model]
    present = [i for i in sample if i in model]
    return {
        "count": handle.count(), "acknowledged": len(model), "wrong": wrong[:5], "n_wrong": len(wrong),
        "content": hashlib.sha256(json.dumps([[r.id, r.text] if r else None for r in records]).encode()).hexdigest(),
        "dense": dense, "lexical": lexical,
        "own_dense": float(np.mean([i in d for i, d in zip(present, dense, strict=True)])) if present else 1.0,
        "own_lexical": float(np.mean([i in x for i, x in zip(present, lexical, strict=True)])) if present else 1.0,
    }


def _check_state(snap: JSONLike, fail: Callable[[str], None], where: str, *, lexical_min: float = 0.9) -> None:
    if snap["count"] != snap["acknowledged"]:
        fail(f"{where}: count {snap['count']} != {snap['acknowledged']} acknowledged")
    if snap["n_wrong"]:
        fail(f"{where}: {snap['n_wrong']} acknowledged documents missing or changed, e.g. {snap['wrong']}")
    if snap["own_dense"] < 1.0:
        fail(f"{where}: only {snap['own_dense']:.2f} of sampled documents find themselves by vector")
    if snap["own_lexical"] < lexical_min:
        fail(f"{where}: only {snap['own_lexical']:.2f} of sampled documents find themselves by text")


# -- the workload: fill, check, free, write again --------------------------------------------------
def drive(handle: Any, corpus: Corpus, batch: int, after: int, free: Callable[[], Any],
          create_other: Callable[[], str | None] | None = None,
          raw_status: Callable[[list[str], list[str], np.ndarray], str] | None = None,
          squeeze: Callable[[], None] | None = None) -> tuple[JSONLike, Model]:
    """Upsert batches until one raises ResourceExhaustedError, check that it changed nothing, call
    `free()` (which may hand back a new handle), then write that batch and `after` more.
    `create_other()` tries a second collection on the full disk: its error class name, or None.
    `squeeze()` takes the disk's last bytes, so that a small write LMDB still has pages for meets a
    lexical index that has none (it must be acknowledged, and lexical search catch up later)."""
    from nestvec.errors import ResourceExhaustedError

    out: JSONLike = {"failures": []}
    fail = out["failures"].append
    model: Model = {}
    pos, started, failed = 0, time.perf_counter(), None
    while pos < len(corpus.ids):
        lo, hi = pos, min(pos + batch, len(corpus.ids))
        try:
            handle.upsert(corpus.ids[lo:hi], texts=corpus.texts[lo:hi], vectors=corpus.vectors[lo:hi])
        except ResourceExhaustedError as err:
            failed, out["error"] = (lo, hi), str(err)[:400]
            break
        model.update({corpus.ids[i]: (corpus.texts[i], i) for i in range(lo, hi)})
        pos = hi
    out["fill_s"] = round(time.perf_counter() - started, 2)
    out["acked_before_full"] = len(model)
    if failed is None:
        fail(f"the disk never filled: all {len(model)} documents fit; use a smaller tmpfs or limit")
        return out, model
    lo, hi = failed
    sample = _sample(model)
    before = snapshot(handle, model, corpus, sample)
    _check_state(before, fail, "after the failed write", lexical_min=0.0)  # lexical may be behind: see below
    if any(r is not None for r in handle.get(corpus.ids[lo:hi])):
        fail("documents of the failed batch are readable")
    if raw_status is not None:
        out["grpc_status"] = raw_status(corpus.ids[lo:hi], corpus.texts[lo:hi], corpus.vectors[lo:hi])
        if out["grpc_status"] != "RESOURCE_EXHAUSTED":
            fail(f"over gRPC the full disk is {out['grpc_status']}, not RESOURCE_EXHAUSTED")

    # An overwrite of half the stored documents, with longer texts and other vectors, needs more
    # room than LMDB has freed: it must fail and leave every one of them as it was.
    victims = sorted(model)[::2]
    rows = [(model[v][1] + 1) % len(corpus.ids) for v in victims]
    overwrite = (victims, [f"{corpus.texts[r]} (rewritten on a full disk) {corpus.texts[r]}" for r in rows],
                 corpus.vectors[rows])
    try:
        handle.upsert(overwrite[0], texts=overwrite[1], vectors=overwrite[2])
    except ResourceExhaustedError:
        out["overwrite_while_full"] = "failed"
        again = snapshot(handle, model, corpus, sample)
        for key in ("count", "content", "dense", "lexical"):
            if again[key] != before[key]:
                fail(f"a failed overwrite changed what readers see ({key})")
    else:
        out["overwrite_while_full"] = "written"
        model.update({v: (t, r) for v, t, r in zip(victims, overwrite[1], rows, strict=True)})
        fail(f"an overwrite of {len(victims)} documents fit on the full disk: the failure was not tested")
    try:
        gone = sample[-3:]
        handle.delete(gone)
        out["delete_while_full"] = "written"
        for key in gone:
            model.pop(key)
    except ResourceExhaustedError:
        out["delete_while_full"] = "failed"
    if squeeze is not None:
        squeeze()
        few = sample[1:5]
        few_rows = [(model[v][1] + 7) % len(corpus.ids) for v in few]
        texts = [f"squeezed {corpus.texts[r]}" for r in few_rows]
        try:
            handle.upsert(few, texts=texts, vectors=corpus.vectors[few_rows])
        except ResourceExhaustedError:
            out["small_write_squeezed"] = "failed"
        else:
            out["small_write_squeezed"] = "written"
            model.update({v: (t, r) for v, t, r in zip(few, texts, few_rows, strict=True)})
            with contextlib.suppress(Exception):
                out["lexical_behind_squeezed"] = bool(handle.info().get("lexical_behind", False))
    if create_other is not None:
        out["create_while_full"] = create_other()
        if out["create_while_full"] != "ResourceExhaustedError":
            fail(f"creating a collection on the full disk gave {out['create_while_full']}")
    _check_state(snapshot(handle, model, corpus, sample), fail, "while full", lexical_min=0.0)

    handle = free()
    started = time.perf_counter()
    try:
        for i in range(after + 1):
            a, b = lo + i * batch, min(lo + (i + 1) * batch, len(corpus.ids))
            if a >= b:
                break
            handle.upsert(corpus.ids[a:b], texts=corpus.texts[a:b], vectors=corpus.vectors[a:b])
            model.update({corpus.ids[j]: (corpus.texts[j], j) for j in range(a, b)})
        if out["overwrite_while_full"] == "failed":
            handle.upsert(overwrite[0], texts=overwrite[1], vectors=overwrite[2])
            model.update({v: (t, r) for v, t, r in zip(victims, overwrite[1], rows, strict=True)})
    except ResourceExhaustedError as err:
        fail(f"a write after space was freed failed: {err}")
    out["recover_s"] = round(time.perf_counter() - started, 2)
    out["acked_total"] = len(model)
    final = snapshot(handle, model, corpus, _sample(model))
    _check_state(final, fail, "after space was freed")
    out["final"] = {k: final[k] for k in ("count", "content", "own_dense", "own_lexical")}
    with contextlib.suppress(Exception):
        out["disk_bytes"] = int(handle.info()["disk_bytes"])
        out["lexical_behind"] = bool(handle.info().get("lexical_behind", False))
    return out, model


def verify(root: Path, model: Model, corpus: Corpus, max_disk_bytes: int | None) -> JSONLike:
    """A fresh process reopens the folder: exactly the acknowledged documents, searchable."""
    import nestvec

    out: JSONLike = {"failures": []}
    with nestvec.connect(root, max_disk_bytes=max_disk_bytes) as client:
        handle = client.get_collection(COLLECTION)
        snap = snapshot(handle, model, corpus, _sample(model))
        _check_state(snap, out["failures"].append, "reopened in a fresh process")
        out.update({k: snap[k] for k in ("count", "content", "own_dense", "own_lexical")})
    return out


# -- child processes -------------------------------------------------------------------------------
def _child(argv: list[str]) -> None:
    """`python -c 'from bench.tortures.disk import _child; _child(sys.argv[1:])' ROLE JSON`."""
    role, spec = argv[0], json.loads(argv[1])
    corpus, root = Corpus.load(), Path(spec["root"])
    if role == "verify":
        model = {k: (t, r) for k, (t, r) in json.loads(Path(spec["model"]).read_text()).items()}
        print("RESULT " + json.dumps(verify(root, model, corpus, spec.get("cap"))), flush=True)
        return
    import nestvec

    client = nestvec.connect(root, max_disk_bytes=spec.get("cap"))
    handle = client.create_collection(COLLECTION, encoder=None, dim=384, index="spann")

    def free() -> Any:
        nonlocal client
        if spec["mode"] == "tmpfs":  # the parent deletes the ballast file
            print("FULL", flush=True)
            if sys.stdin.readline().strip() != "FREED":
                raise SystemExit("the parent did not free space")
            return handle
        client.close()  # the limit is the catalog's: open the folder again with a larger one
        client = nestvec.connect(root, max_disk_bytes=spec["freed_cap"])
        return client.get_collection(COLLECTION)

    def create_other() -> str | None:
        try:
            client.create_collection("other", encoder=None, dim=384)
        except Exception as err:  # the class is the answer
            return type(err).__name__
        finally:
            leftovers = [p.name for p in root.iterdir() if p.name.startswith(".creating-") or p.name == "other"]
            if leftovers:
                print("LEFTOVERS " + json.dumps(leftovers), flush=True)
        return None

    def squeeze() -> None:
        fill(Path(spec["squeeze"]))

    out, model = drive(handle, corpus, spec["batch"], spec["after"], free,
                       create_other if spec["mode"] == "tmpfs" else None,
                       squeeze=squeeze if spec.get("squeeze") else None)
    Path(spec["model"]).write_text(json.dumps(model))
    client.close()
    print("RESULT " + json.dumps(out), flush=True)


class Child:
    """A child process of this module; its stdout read line by line with a deadline."""

    def __init__(self, role: str, spec: JSONLike, log: Path, timeout_s: float) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self._log: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from bench.tortures.disk import _child; _child(sys.argv[1:])",
             role, json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, cwd=REPO,
            env=env, text=True)
        self.deadline = time.monotonic() + timeout_s
        self.extra: list[str] = []

    def line(self, prefix: str) -> str | None:
        """The rest of the next stdout line starting with `prefix` (None: the child ended or timed out)."""
        assert self.proc.stdout is not None
        while time.monotonic() < self.deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if not ready:
                continue
            text = self.proc.stdout.readline()
            if not text:
                return None
            if text.startswith(prefix):
                return text[len(prefix):].strip()
            self.extra.append(text.strip())
        return None

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        """Its exit code (negative: the signal that killed it); killed if still running."""
        try:
            code = self.proc.wait(max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


# -- where the space runs out ----------------------------------------------------------------------
@dataclass
class Space:
    """A data folder whose disk fills: on a tmpfs with a ballast file, or under a storage limit."""

    mode: str
    root: Path
    mount: Path | None = None
    ballast: Path | None = None
    cap: int | None = None
    freed_cap: int | None = None

    def free(self) -> None:
        if self.ballast is not None:
            self.ballast.unlink()
            self.ballast = None
        if self.mount is not None:
            (self.mount / "squeeze").unlink(missing_ok=True)

    def squeeze(self) -> None:
        """Fill what the collection left free on the tmpfs (no-op under a storage limit)."""
        if self.mount is not None:
            fill(self.mount / "squeeze")


def fill(path: Path) -> int:
    """Write `path` until the disk refuses; the bytes written."""
    written = 0
    with contextlib.suppress(OSError), path.open("wb") as fh:  # a disk full to the last byte has no room for it
        for size in (MB, 64 << 10, 4096, 512):
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\x5a" * size)
                    fh.flush()
                    os.fsync(fh.fileno())
                    written += size
    return written


def _mount(folder: Path, size_mb: int) -> str | None:
    """Mount a tmpfs on `folder`; the error when this machine does not allow it."""
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


def _unmount(folder: Path) -> None:
    for _ in range(20):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode == 0:
            return
        time.sleep(0.25)
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@contextlib.contextmanager
def space(args: argparse.Namespace, work: Path, tag: str) -> Iterator[Space]:
    """A fresh full-able data folder; a tmpfs is always unmounted on the way out."""
    folder = work / tag
    folder.mkdir()
    error = _mount(folder, args.tmpfs_mb) if args.mode in ("auto", "tmpfs") else "not tried (--mode cap)"
    if error is None:
        try:
            ballast = folder / "ballast"
            with ballast.open("wb") as fh:
                fh.write(b"\xa5" * (args.ballast_mb * MB))
            yield Space("tmpfs", folder / "data", mount=folder, ballast=ballast)
        finally:
            _unmount(folder)
        return
    if args.mode == "tmpfs":
        raise RuntimeError(f"--mode tmpfs, but mount failed: {error}")
    args.mount_error = error
    yield Space("cap", folder / "data", cap=args.cap_mb * MB, freed_cap=args.freed_cap_mb * MB)


# -- the two transports ----------------------------------------------------------------------------
def run_embedded(args: argparse.Namespace, work: Path) -> JSONLike:
    with space(args, work, "embedded") as where:
        model_file = work / "embedded-model.json"
        spec = {"root": str(where.root), "mode": where.mode, "cap": where.cap, "freed_cap": where.freed_cap,
                "batch": args.batch, "after": args.after, "model": str(model_file),
                "squeeze": str(where.mount / "squeeze") if where.mount else None}
        child = Child("embedded", spec, work / "embedded.log", args.timeout_s)
        out: JSONLike = {"transport": "embedded", "mode": where.mode}
        if where.mode == "tmpfs" and child.line("FULL") is not None:
            where.free()
            child.send("FREED")
        raw = child.line("RESULT ")
        code = child.finish()
        out["exit_code"] = code
        if raw is None:
            log = (work / "embedded.log").read_text(errors="replace")[-1500:]
            out["failures"] = [f"the embedded process ended without a result (exit {code}"
                               f"{', killed by signal ' + str(-code) if code < 0 else ''}): {log}"]
            return out
        out.update(json.loads(raw))
        out["failures"] += [f"left behind after a failed create: {x}" for x in child.extra if x.startswith("LEFT")]
        out["verify"] = _verify(work, "embedded", where, model_file, args)
        out["failures"] += out["verify"].pop("failures", [])
        return out


def run_grpc(args: argparse.Namespace, work: Path) -> JSONLike:
    import grpc

    import nestvec
    from bench.tortures._server import ServerProcess
    from nestvec.types import Record
    from nestvec.wire import convert
    from nestvec.wire._pb.nestvec.v1 import nestvec_pb2 as pb
    from nestvec.wire._pb.nestvec.v1 import nestvec_pb2_grpc as pb_grpc

    corpus = Corpus.load()
    with space(args, work, "grpc") as where:
        where.root.mkdir(parents=True, exist_ok=True)
        log = work / "server.log"

        def start(cap: int | None) -> ServerProcess:
            server = ServerProcess(where.root, log, serve_args=["--max-disk-mb", str(cap // MB)] if cap else ())
            server.start()
            server.wait_ready()
            return server

        server = start(where.cap)
        client = nestvec.connect(f"grpc://{server.target}")
        out: JSONLike = {"transport": "grpc", "mode": where.mode}
        model: Model = {}
        try:
            handle = client.create_collection(COLLECTION, encoder=None, dim=384)

            def raw_status(ids: list[str], texts: list[str], vectors: np.ndarray) -> str:
                request = pb.UpsertRequest(collection=COLLECTION, points=[convert.to_pb_point(Record(i, t, {}))
                                                                          for i, t in zip(ids, texts, strict=True)],
                                           vectors=convert.to_pb_vectors(vectors))
                with server.channel() as channel:
                    try:
                        pb_grpc.PointsStub(channel).Upsert(request, timeout=60)
                    except grpc.RpcError as err:
                        call: Any = err
                        return str(call.code().name)
                return "OK"

            def create_other() -> str | None:
                try:
                    client.create_collection("other", encoder=None, dim=384)
                except Exception as err:
                    return type(err).__name__
                finally:
                    if "other" in client.list_collections():
                        out.setdefault("failures_extra", []).append("a failed create left a collection")
                return None

            def free() -> Any:
                nonlocal server, client
                if not server.alive():
                    raise RuntimeError("the server died on the full disk")
                if where.mode == "tmpfs":
                    where.free()
                    return handle
                client.close()
                server.stop()
                server = start(where.freed_cap)
                client = nestvec.connect(f"grpc://{server.target}")
                return client.get_collection(COLLECTION)

            result, model = drive(handle, corpus, args.batch, args.after, free,
                                  create_other if where.mode == "tmpfs" else None, raw_status,
                                  where.squeeze if where.mode == "tmpfs" else None)
            out.update(result)
            out["failures"] += out.pop("failures_extra", [])
            out["server_alive"] = server.alive()
            if not server.alive():
                out["failures"].append("the server died")
        finally:
            client.close()
            out["server_exit"] = server.stop()
        if server.log_text().count("Fatal Python error") or (out["server_exit"] or 0) < 0:
            out["failures"].append(f"the server crashed: exit {out['server_exit']}")
        model_file = work / "grpc-model.json"
        model_file.write_text(json.dumps(model))
        out["verify"] = _verify(work, "grpc", where, model_file, args)
        out["failures"] += out["verify"].pop("failures", [])
        return out


def _verify(work: Path, tag: str, where: Space, model_file: Path, args: argparse.Namespace) -> JSONLike:
    child = Child("verify", {"root": str(where.root), "model": str(model_file), "cap": where.freed_cap},
                  work / f"{tag}-verify.log", args.timeout_s)
    raw = child.line("RESULT ")
    code = child.finish()
    if raw is None:
        return {"failures": [f"the verifying process ended without a result (exit {code})"]}
    result: JSONLike = json.loads(raw)
    return result


def run(args: argparse.Namespace) -> JSONLike:
    started = time.perf_counter()
    runs: list[JSONLike] = []
    work = Path(tempfile.mkdtemp(prefix="nestvec-disk-"))
    try:
        for transport in [t.strip() for t in args.transports.split(",") if t.strip()]:
            runs.append((run_embedded if transport == "embedded" else run_grpc)(args, work))
    finally:
        if not os.environ.get("NESTVEC_KEEP_TORTURE"):
            shutil.rmtree(work, ignore_errors=True)
    failures = [f"{r['transport']}: {f}" for r in runs for f in r.get("failures", [])]
    return {
        "passed": not failures and bool(runs),
        "mode": runs[0]["mode"] if runs else None,
        "mount_error": getattr(args, "mount_error", None),
        "failures": failures,
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }


def plot(result: JSONLike, ax: Any) -> None:
    """Documents acknowledged before the disk was full and in all, per transport."""
    runs = result.get("runs", [])
    names = [f"{r['transport']}\n({r['mode']})" for r in runs]
    x = np.arange(len(runs))
    ax.bar(x - 0.2, [r.get("acked_before_full", 0) for r in runs], 0.4, label="acknowledged when full")
    ax.bar(x + 0.2, [r.get("acked_total", 0) for r in runs], 0.4, label="after space was freed")
    ax.set_xticks(x, names)
    ax.set_ylabel("documents")
    ax.legend(fontsize=8)
