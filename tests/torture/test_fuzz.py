"""API fuzzing, short version of `python bench/torture.py fuzz`: the fixed edge cases and a few hundred
random ones against a real `nestvec serve` process; then one regression test per bug it found,
each against an in-process server (the request that failed, and the status it must get now)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.tortures import fuzz, part_args
from nestvec.catalog import Catalog
from nestvec.errors import InvalidArgumentError
from nestvec.service.server import build_server
from nestvec.wire._pb.nestvec.v1 import nestvec_pb2 as pb
from realdata import shipped_embeddings

IDS, VECTORS = shipped_embeddings("scifact")
KEY = (("authorization", "Bearer k"),)


def _args(**overrides: object) -> argparse.Namespace:
    return part_args(fuzz, **overrides)


def test_fuzzed_server_never_crashes_hangs_or_changes_data_on_rejected_requests() -> None:
    result = fuzz.run(_args(cases=150, seed=14))
    print(json.dumps({k: result[k] for k in ("seed", "cases", "codes", "bug_count", "seconds")}))
    assert result["bugs"] == [] and result["passed"], result["bugs"]
    assert not result["crashed"] and result["hangs"] == 0 and result["server_exit"] == 0
    assert result["cases"] >= 150 + 150  # the random ones and the fixed edge cases
    assert result["files_outside_data"] == []
    assert {"raw_bytes", "mutated", "no_key", "upsert", "search", "create", "drop"} <= set(result["by_kind"])
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"} <= set(result["codes"])
    assert result["rejected_writes_checked"] > 100 and result["accepted_writes"] > 5
    assert result["by_kind"]["no_key"].keys() <= {"UNAUTHENTICATED", "OK"}  # OK: health only


def test_a_case_replays_from_its_seed() -> None:
    corpus = fuzz.Corpus.load(50)

    def gen(i: int) -> fuzz.Gen:
        import random

        return fuzz.Gen(random.Random(f"3:{i}"), corpus, "escape", Path("/nowhere"), encoder=False)

    assert [gen(7).case().payloads for _ in range(2)] == [gen(7).case().payloads] * 2
    assert gen(7).case().payloads != gen(8).case().payloads


def test_no_case_may_get_internal_and_digests_see_changes() -> None:
    search = fuzz.METHODS["Search"]
    good = fuzz.Case("search", search, [pb.SearchRequest(collection="sci", k=3).SerializeToString()], "ok")
    garbage = fuzz.Case("raw_bytes", search, [b"\xff\xff\xff"], "garbage")
    assert "INTERNAL" not in good.expected() | garbage.expected() and "INVALID_ARGUMENT" in garbage.expected()
    anonymous = fuzz.Case("no_key", search, good.payloads, "no key", key=None)
    assert anonymous.expected() == {"UNAUTHENTICATED"}
    before = {"names": ["sci"], "sci": {"count": 3, "points": [("a", True, "h", "")]}}
    assert fuzz.difference(before, before) == ""
    assert "points" in fuzz.difference(before, {"names": ["sci"], "sci": {"count": 3, "points": [("a", False, None,
                                                                                                     "")]}})
    assert "collections" in fuzz.difference(before, {"names": []})


# -- regressions: one per bug the fuzzer found ------------------------------------------------------------
@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    catalog = Catalog(tmp_path_factory.mktemp("fuzz-regressions"))
    collection = catalog.create_collection("sci", encoder=None, dim=384)
    collection.upsert(IDS[:100], vectors=VECTORS[:100], texts=[f"graphene heat {i}" for i in range(100)],
                      metadata=[{"i": i} for i in range(100)])
    server, port = build_server(catalog, address="127.0.0.1:0", api_keys=["k"])
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield ch
    server.stop(1).wait()
    catalog.close()


def _code(channel: grpc.Channel, method: str, request: object) -> tuple[str, str, float]:
    """(status, details, seconds) of one call made with the generated message's bytes."""
    start = time.perf_counter()
    try:
        channel.unary_unary(method)(request.SerializeToString(), metadata=KEY, timeout=30)  # type: ignore[attr-defined]
        return "OK", "", time.perf_counter() - start
    except grpc.RpcError as err:
        failed = err
        return failed.code().name, failed.details() or "", time.perf_counter() - start  # type: ignore[attr-defined]


def _search(**fields: object) -> pb.SearchRequest:
    vector = pb.Vectors(data=VECTORS[0].astype("<f4").tobytes(), dim=384, count=1)
    return pb.SearchRequest(collection="sci", vector=vector, k=5, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["/nestvec.v1.Points/UpsertStream", "/nestvec.v1.Points/Search",
                                    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"])
def test_bug_unparseable_bytes_on_a_stream_kept_the_server_from_stopping(tmp_path: Path, method: str) -> None:
    """gRPC's own parse failure on a request stream leaked the call (INTERNAL to the client):
    server.stop(30) had not returned after 40 s, and SIGTERM never stopped `nestvec serve`.
    Requests are parsed by nestvec now: INVALID_ARGUMENT naming the message, and a prompt stop."""
    catalog = Catalog(tmp_path)
    server, port = build_server(catalog, address="127.0.0.1:0", api_keys=["k"])
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as failed:
                if "Search" in method:
                    ch.unary_unary(method)(b"\xff\xff\xff", metadata=KEY, timeout=10)
                else:
                    list(ch.stream_stream(method)(iter([b"\xff\xff\xff"] * 5), metadata=KEY, timeout=10))
            err: Any = failed.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "the bytes are not a " in err.details()
        assert len(ch.unary_unary("/nestvec.v1.Collections/List")(b"", metadata=KEY, timeout=10)) >= 0
    start = time.perf_counter()
    assert server.stop(30).wait(10), "the server did not stop"
    assert time.perf_counter() - start < 5
    catalog.close()


@pytest.mark.parametrize("filter_json", [fuzz.deep_filter(1000), "[" * 100_000 + "]" * 100_000])
def test_bug_json_nested_past_the_recursion_limit_was_internal(channel: grpc.Channel, filter_json: str) -> None:
    """json.loads raised RecursionError (not JSONDecodeError): INTERNAL. Now INVALID_ARGUMENT."""
    code, details, _ = _code(channel, "/nestvec.v1.Points/Search", _search(filter_json=filter_json))
    assert (code, details) == ("INVALID_ARGUMENT", "filter: nests too deeply to parse")
    point = pb.Point(id="deep", metadata_json='{"a": ' * 5000 + "1" + "}" * 5000)
    upsert = pb.UpsertRequest(collection="sci", points=[point], vectors=pb.Vectors(
        data=VECTORS[0].astype("<f4").tobytes(), dim=384, count=1))
    assert _code(channel, "/nestvec.v1.Points/Upsert", upsert)[0] == "INVALID_ARGUMENT"


def test_bug_a_filter_dict_500_deep_overflowed_the_evaluator(tmp_path: Path) -> None:
    """Over gRPC the JSON parser's limit comes first (above); an embedded caller's dict reached
    MetadataTable._node, which recursed past the limit: RecursionError, not InvalidArgumentError."""
    import nestvec

    collection = nestvec.connect(tmp_path).create_collection("c", encoder=None, dim=384)
    collection.upsert(IDS[:10], vectors=VECTORS[:10], metadata=[{"i": i} for i in range(10)])
    deep: dict[str, object] = {"i": 1}
    for _ in range(600):
        deep = {"$and": [deep]}
    with pytest.raises(InvalidArgumentError, match="nest more than"):
        collection.search(VECTORS[0], k=3, filter=deep)
    shallow: dict[str, object] = {"i": 1}
    for _ in range(20):
        shallow = {"$and": [shallow]}
    assert [h.id for h in collection.search(VECTORS[0], k=3, filter=shallow)] == [IDS[1]]


def test_bug_an_or_of_50000_conditions_held_the_search_thread(channel: grpc.Channel) -> None:
    """Each condition scans every row: 5 s on 300 rows, with every other search waiting behind it."""
    code, details, seconds = _code(channel, "/nestvec.v1.Points/Search", _search(filter_json=fuzz.wide_filter(50_000)))
    assert code == "INVALID_ARGUMENT" and "conditions" in details and seconds < 2
    assert _code(channel, "/nestvec.v1.Points/Search", _search(filter_json=fuzz.wide_filter(200)))[0] == "OK"


def test_bug_a_10_mb_lexical_query_held_the_search_thread(channel: grpc.Channel) -> None:
    """tantivy parsed and scored all 2,000,000 words: 3 to 6 s. Now the first 65,536 characters."""
    request = pb.SearchRequest(collection="sci", text="heat " * 2_000_000, k=5, params=pb.SearchParams(mode="lexical"))
    code, _, seconds = _code(channel, "/nestvec.v1.Points/Search", request)
    assert code == "OK" and seconds < 2


def test_bug_a_dotted_capital_i_split_a_query_word_into_a_phrase(channel: grpc.Channel) -> None:
    """"İ".lower() is "i" plus a combining dot, which tantivy splits: a phrase query on a field
    without positions, INTERNAL ValueError. Lower-cased before splitting now."""
    request = pb.SearchRequest(collection="sci", text="İrtyhlal graphene", k=5, params=pb.SearchParams(mode="lexical"))
    assert _code(channel, "/nestvec.v1.Points/Search", request)[0] == "OK"


@pytest.mark.parametrize("dim", [2**32 - 1, 100_000_000])
def test_bug_a_huge_dim_allocated_gigabytes(channel: grpc.Channel, dim: int) -> None:
    """dim 2**32-1 asked numpy for 16 GiB (the server hung past the deadline, then MemoryError)."""
    code, details, seconds = _code(channel, "/nestvec.v1.Collections/Create",
                                   pb.CreateCollectionRequest(name="huge", no_encoder=True, dim=dim))
    assert code == "INVALID_ARGUMENT" and details.startswith("dim:") and seconds < 2


def test_bug_error_messages_quoting_a_100_kb_name_lost_their_status(channel: grpc.Channel) -> None:
    """The whole name went into the status header; the client refused it (RESOURCE_EXHAUSTED)."""
    code, details, _ = _code(channel, "/nestvec.v1.Collections/Describe", pb.DescribeCollectionRequest(name="a" * 100_000))
    assert code == "INVALID_ARGUMENT" and "characters cut" in details and len(details) < 2000


def test_bug_an_encoder_folder_that_is_no_model_was_internal(channel: grpc.Channel) -> None:
    """A server-side folder without a model (here /etc) raised transformers' ValueError: INTERNAL."""
    code, details, _ = _code(channel, "/nestvec.v1.Collections/Create", pb.CreateCollectionRequest(name="e",
                                                                                                  encoder="/etc"))
    assert code == "INVALID_ARGUMENT" and details.startswith("encoder:")


def test_bug_a_10_mb_text_took_18_s_to_encode() -> None:
    """The tokenizer read all 10 MB before truncating to 256 tokens; the server missed a 10 s
    deadline on upsert and search. Texts are cut to 64 characters per token first."""
    from nestvec.encoders import load_encoder

    encoder = load_encoder()
    big = "graphene conducts heat " * 450_000
    start = time.perf_counter()
    vector = encoder.encode(big)
    assert time.perf_counter() - start < 3
    assert float(vector @ encoder.encode(big[:5000])) > 0.9999
