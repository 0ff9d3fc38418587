"""Fixtures: a real gRPC server on localhost, and clients of both transports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import nestvec
from nestvec.client.base import ClientBase
from servers import ADMIN_KEY, READER_KEY, RunningServer


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[RunningServer]:
    running = RunningServer(tmp_path / "served", api_keys=[ADMIN_KEY], read_only_keys=[READER_KEY])
    yield running
    running.stop()


@pytest.fixture(params=["local", "remote"])
def any_client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClientBase]:
    """The same tests run against the embedded folder and a real server (qdrant's habit)."""
    if request.param == "local":
        client: ClientBase = nestvec.connect(tmp_path / "local")
        yield client
        client.close()
        return
    running = RunningServer(tmp_path / "served", api_keys=[ADMIN_KEY])
    client = running.client()
    yield client
    client.close()
    running.stop()
