"""Fixtures for framework integrations: one real gRPC server per module (each test uses its own collection)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestvec.catalog import Catalog
from nestvec.client.remote import RemoteClient
from nestvec.service.server import build_server

API_KEY = "integration-secret"

# The integrations are optional extras: without langchain-tests (the `dev` extra) skip, don't error.
collect_ignore_glob = [] if importlib.util.find_spec("langchain_tests") else ["test_langchain.py"]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server shared by a module's tests: starting one per test would dominate the suite's runtime."""
    catalog = Catalog(tmp_path_factory.mktemp("served"))
    server, port = build_server(catalog, address="127.0.0.1:0", api_keys=[API_KEY])
    server.start()
    yield f"grpc://127.0.0.1:{port}"
    server.stop(2).wait()
    catalog.close()


@pytest.fixture()
def api_key() -> str:
    return API_KEY


@pytest.fixture()
def remote_client(server_url: str) -> Iterator[RemoteClient]:
    client = RemoteClient(server_url, api_key=API_KEY)
    yield client
    client.close()


@pytest.fixture()
def local_root(tmp_path: Path) -> Path:
    return tmp_path / "embedded"
