"""Crash consistency, short version of `python bench/torture.py crash`: a live workload SIGKILLed
at random moments, then reopened and held to every promise (seeds are printed for replay)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import nestvec
from bench.tortures import crash, part_args


def _args(**overrides: object) -> argparse.Namespace:
    return part_args(crash, **overrides)


def test_sigkilled_workloads_keep_every_acknowledged_write_and_delete() -> None:
    result = crash.run(_args(trials=4, seed=7, max_run_s=3.0, recode_share=0.5))
    print(result["replay"], [r["failures"] for r in result["reports"]])
    assert result["passed"], result["reports"]
    assert result["trials_passed"] == 4
    assert result["killed_mid_run"] >= 3  # the kills landed inside the workload, not after it ended
    assert result["acked_ops"] > 20
    assert all(r["index"] == "spann" for r in result["reports"])
    assert result["splits"] + result["merges"] > 0  # the kills fell among posting-list rebalancing
    assert all(r["recall_reopened"] >= r["recall_fresh"] - crash.RECALL_TOLERANCE for r in result["reports"])


def _populated(tmp_path: Path) -> tuple[object, crash.Expected, crash.Pool]:
    pool = crash.Pool.load(1500)
    expected = crash.Expected()
    collection = nestvec.connect(tmp_path / "store").create_collection("c", encoder=None, dim=384, index="spann")
    for i in range(3):
        op = crash.operation(5, i, len(pool.vectors), None, first_trial=True)
        if op.kind == "upsert":
            texts, vectors, metadata = crash.written(pool, 5, op)
            collection.upsert(list(op.ids), texts=texts, vectors=vectors, metadata=metadata)
        elif op.kind == "delete":
            collection.delete(list(op.ids))
        expected.apply(pool, 5, op)
    return collection, expected, pool


def test_the_checker_catches_a_lost_write_a_stale_vector_and_a_resurrected_delete(tmp_path: Path) -> None:
    """The crash check must be able to fail: damage the collection behind the model's back."""
    collection, expected, pool = _populated(tmp_path)
    failures, figures = crash.check(collection, expected, pool, tmp_path)
    assert failures == [] and figures["live"] == len(expected.live)

    lost = sorted(expected.live)[0]
    collection.delete([lost])  # an "acknowledged" write the store no longer has
    failures, _ = crash.check(collection, expected, pool, tmp_path)
    assert any("count" in f for f in failures) and any("missing" in f for f in failures)

    text, meta, vector = expected.live[lost]
    other = np.roll(vector, 1)
    collection.upsert([lost], texts=[text], vectors=[other], metadata=[meta])  # right text, wrong vector
    failures, _ = crash.check(collection, expected, pool, tmp_path)
    assert any("vector codes differ" in f for f in failures)

    collection.upsert([lost], texts=[text], vectors=[vector], metadata=[meta])
    gone = sorted(expected.live)[1]
    expected.deleted[gone] = expected.live.pop(gone)[0::2]  # the model says deleted; the store still has it
    failures, _ = crash.check(collection, expected, pool, tmp_path)
    assert any("came back in get" in f for f in failures)
    assert any("came back in dense search" in f for f in failures)
    assert any("came back in lexical search" in f for f in failures)
    collection.close()


def test_the_log_tells_acknowledged_from_in_flight(tmp_path: Path) -> None:
    log = tmp_path / "ops.log"
    log.write_text("ready\nbegin 0\nack 0\nbegin 1\nevent split 2\nevent merge 1\n")
    record = crash.Log.read(log)
    assert record.ready and record.acked == [0] and record.in_flight == 1
    assert (record.splits, record.merges) == (2, 1)
    log.write_text("ready\nbegin 0\nack 0\ndone\n")
    assert crash.Log.read(log).in_flight is None
