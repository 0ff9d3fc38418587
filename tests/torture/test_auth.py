"""Auth, short version of `python bench/torture.py auth` (the same run: it is small): every RPC with no
key, wrong keys, the read-only key and the admin key, on a plaintext and a TLS `nestvec serve`."""

from __future__ import annotations

import argparse

from bench.tortures import auth, part_args


def _args(**overrides: object) -> argparse.Namespace:
    return part_args(auth, **overrides)


def test_every_rpc_checks_its_key_tls_refuses_plaintext_and_keys_never_leak() -> None:
    result = auth.run(_args())
    assert result["mismatches"] == [] and result["denied_writes_changed"] == [], result["mismatches"]
    assert result["key_leaks"] == [] and result["passed"]
    rpcs = set(result["rpcs"])
    assert {"/nestvec.v1.Points/UpsertStream", "/nestvec.v1.Diagnostics/Stats", "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"} <= rpcs
    assert len(rpcs) == 16 and result["calls"] == 2 * 16 * len(result["identities"])
    for server in ("plaintext", "tls"):
        table = result["servers"][server]["table"]
        assert table["/nestvec.v1.Points/Upsert"]["read-only key"] == "PERMISSION_DENIED"
        assert table["/nestvec.v1.Points/Search"]["read-only x-api-key"] == "OK"
        assert table["/nestvec.v1.Collections/Drop"]["no key"] == "UNAUTHENTICATED"
        assert table["/nestvec.v1.Collections/Drop"]["admin key"] == "OK"
        assert table["/grpc.health.v1.Health/Check"]["no key"] == "OK"  # open to probes, by design
        assert table["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"]["wrong key"] == "UNAUTHENTICATED"
    assert set(result["servers"]["tls"]["tls"].values()) == {"UNAVAILABLE"}
    assert result["scanned_bytes"] > 10_000  # logs, replies and data files were read, not skipped


def test_the_expectations_and_the_leak_search_can_fail() -> None:
    upsert = auth.Rpc("nestvec.v1.Points", "Upsert", False, False)
    assert auth.expected(upsert, "read-only key") == {"PERMISSION_DENIED"}
    assert auth.expected(upsert, "admin key cut") == {"UNAUTHENTICATED"}
    keys = {"admin": "adm1n-0123456789abcdef"}
    assert auth.leaks({"log": "invalid key adm1n-01234567"}, keys) == []
    assert auth.leaks({"log": "got Bearer adm1n-0123456789abcdef"}, keys) == ["admin key in log"]
    assert auth.leaks({"reply": "key 0123456789abcde"}, keys) == ["admin key in reply"]  # cut, prefix dropped
