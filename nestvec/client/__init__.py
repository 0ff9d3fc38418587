"""Public client API: `connect(path)` opens an embedded store (remote gRPC comes with the service)."""

from __future__ import annotations

import os

from nestvec.client.base import ClientBase, CollectionHandle
from nestvec.client.local import LocalClient


def connect(path: str | os.PathLike[str]) -> LocalClient:
    """Open (or create) a data folder of collections, in-process."""
    return LocalClient(path)


__all__ = ["ClientBase", "CollectionHandle", "LocalClient", "connect"]
