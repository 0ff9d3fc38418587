"""Public client API: one `connect()` for an embedded folder or a remote gRPC server."""

from __future__ import annotations

import os
from typing import Any

from nestvec.client.base import ClientBase, CollectionHandle
from nestvec.client.local import LocalClient


def connect(target: str | os.PathLike[str], **kwargs: Any) -> ClientBase:
    """A data folder (embedded, in-process) or "grpc://host:port" / "grpcs://..." (remote, same API).
    A data folder with `ray=` ("auto", "host:port", or "" for a local Ray) can hold collections
    sharded and replicated over that Ray cluster (create_collection(..., shards=, replicas=)).
    `max_disk_bytes=` caps each collection's store on disk (see Catalog)."""
    if isinstance(target, str) and target.startswith(("grpc://", "grpcs://")):
        from nestvec.client.remote import RemoteClient

        return RemoteClient(target, **kwargs)
    extra = sorted(set(kwargs) - {"ray", "max_disk_bytes"})
    if extra:
        raise TypeError(f"connect(path) takes only ray= and max_disk_bytes=, got {extra}")
    return LocalClient(target, ray=kwargs.get("ray"), max_disk_bytes=kwargs.get("max_disk_bytes"))


__all__ = ["ClientBase", "CollectionHandle", "LocalClient", "connect"]
