"""A real nestvec gRPC server on localhost for tests."""

from __future__ import annotations

from pathlib import Path

from nestvec.catalog import Catalog
from nestvec.client.remote import RemoteClient
from nestvec.service.server import build_server

ADMIN_KEY = "admin-secret"
READER_KEY = "reader-secret"


class RunningServer:
    def __init__(self, root: Path, **kwargs: object) -> None:
        self.catalog = Catalog(root)
        self.server, self.port = build_server(self.catalog, address="127.0.0.1:0", **kwargs)  # type: ignore[arg-type]
        self.server.start()
        self.url = f"grpc://127.0.0.1:{self.port}"

    def client(self, api_key: str | None = ADMIN_KEY, **kwargs: object) -> RemoteClient:
        return RemoteClient(self.url, api_key=api_key, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.server.stop(2).wait()
        self.catalog.close()
