"""Public client API: one `connect()` for an embedded folder or a remote gRPC server."""

from __future__ import annotations

import os
from typing import Any

from nestvec.client.base import ClientBase, CollectionHandle
from nestvec.client.local import LocalClient


def connect(target: str | os.PathLike[str], **kwargs: Any) -> ClientBase:
    """A data folder (embedded, in-process) or "grpc://host:port" / "grpcs://..." (remote, same API)."""
    if isinstance(target, str) and target.startswith(("grpc://", "grpcs://")):
        from nestvec.client.remote import RemoteClient

        return RemoteClient(target, **kwargs)
    if kwargs:
        raise TypeError(f"connect(path) takes no options, got {sorted(kwargs)}")
    return LocalClient(target)


__all__ = ["ClientBase", "CollectionHandle", "LocalClient", "connect"]
