"""Embedded client: the catalog of a local data folder, in-process."""

from __future__ import annotations

from nestvec.catalog import DEFAULT_CODEC, Catalog, check_name
from nestvec.client.base import ClientBase


class LocalClient(Catalog, ClientBase):
    """`nestvec.connect(path)`: collections are opened in this process."""

    def __enter__(self) -> LocalClient:
        return self


__all__ = ["DEFAULT_CODEC", "LocalClient", "check_name"]
