"""Soak, short version of `python bench/torture.py soak` (ten one-minute intervals there): a
`nestvec serve` process under open-loop searches, upserts and deletes from client processes, with
its memory and descriptors sampled and every acknowledged write checked at the end."""

from __future__ import annotations

import argparse

import pytest

from bench.tortures import part_args, soak


def _args(**overrides: object) -> argparse.Namespace:
    return part_args(soak, **overrides)


def test_mixed_load_has_no_errors_no_descriptor_growth_and_keeps_every_acknowledged_write() -> None:
    result = soak.run(_args(minutes=2, interval_s=8.0, docs=3000, clients=4, search_rate=80.0,
                            upsert_rate=8.0, delete_rate=4.0))
    assert result["passed"], (result["failures"], result["server_log_tail"])
    assert result["errors"] == 0 and result["server_errors"] == 0 and result["content_mismatches"] == 0
    assert result["count"] == result["expected_count"] != 3000  # the writes changed the collection
    assert len(result["interval_rows"]) == 2 and len(result["samples"]) == 3
    assert all(row["rss_mb"] > 0 and row["fds"] > 0 for row in result["interval_rows"])
    assert result["searches"] > 0.8 * 80 * 16  # the offered rate was reached (open loop, 16 s)
    assert result["writes"] > 100 and result["search_p99_ms"] is not None


def test_slopes_are_fitted_per_minute() -> None:
    assert soak.slope_per_minute([0.0, 60.0, 120.0], [100.0, 110.0, 120.0]) == pytest.approx(10.0)
    assert soak.slope_per_minute([0.0], [5.0]) == 0.0
    rows = soak.intervals([(0.5, "search", 0.002), (1.5, "upsert", 0.004), (1.6, "search", 0.010)], 0.0, 1.0, 2)
    assert [r["searches"] for r in rows] == [1, 1] and rows[1]["writes"] == 1 and rows[0]["search_p50_ms"] == 2.0
