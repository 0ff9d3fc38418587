"""A data folder of collections: create, open, list and drop them (used by the embedded client and the server)."""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from nestvec.checks import check_dim
from nestvec.collection import CONFIG_FILE, Collection
from nestvec.compression import make_codec
from nestvec.encoders import BUNDLED_MODEL, Encoder, load_encoder
from nestvec.encoders.st import BUNDLED_ALIASES
from nestvec.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError, invalid
from nestvec.fsutil import fsync_dir, write_json

if TYPE_CHECKING:
    from nestvec.cluster.distributed import DistributedCollection
    from nestvec.cluster.ray_backend import RayBackend

AnyCollection: TypeAlias = "Collection | DistributedCollection"  # local, or a sharded one's front door

DEFAULT_CODEC = "int8"
MIN_DISK_BYTES = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid("name", f"{name!r} is not a valid collection name (letters, digits, '_', '.', '-'; max 128)")
    return name


def _differences(existing: AnyCollection, encoder: Encoder | str | None, dim: int | None, codec: str,
                 index: str) -> list[str]:
    """What an exist_ok create asked for that the existing collection does not have."""
    config, out = existing.config, []
    if isinstance(encoder, str):
        wanted = BUNDLED_MODEL if encoder in BUNDLED_ALIASES else encoder
        have = config.encoder.model if config.encoder else None
        if wanted != have:
            out.append(f"encoder {have!r}, not {wanted!r}")
    elif encoder is None and config.encoder is not None:
        out.append(f"encoder {config.encoder.model!r}, not none")
    elif encoder is not None and (config.encoder is None or config.encoder != encoder.identity):
        out.append("a different encoder")
    if dim is not None and dim != config.dim:
        out.append(f"dim {config.dim}, not {dim}")
    if make_codec(codec, config.dim).spec != config.codec:
        out.append(f"codec {config.codec!r}, not {codec!r}")
    if index != config.index:
        out.append(f"index {config.index!r}, not {index!r}")
    return out


class Catalog:
    """Collections are sub-folders of one data folder; each is opened once and shared.

    With a Ray cluster (`ray`: an address, "auto", or "" for a local Ray), collections created
    with `shards` / `replicas` are sharded and replicated over it (nestvec.cluster).
    `max_disk_bytes`: a storage limit per collection (its store's file, like Milvus's
    diskQuotaPerCollection); a write past it is a ResourceExhaustedError that changes nothing."""

    def __init__(self, path: str | os.PathLike[str], *, ray: str | None = None,
                 cluster: RayBackend | None = None, max_disk_bytes: int | None = None) -> None:
        if max_disk_bytes is not None and (isinstance(max_disk_bytes, bool) or not isinstance(max_disk_bytes, int)
                                           or max_disk_bytes < MIN_DISK_BYTES):
            raise invalid("max_disk_bytes", f"must be an integer >= {MIN_DISK_BYTES} (1 MiB), got {max_disk_bytes!r}")
        self.max_disk_bytes = max_disk_bytes
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, AnyCollection] = {}
        self._lock = threading.Lock()
        if cluster is None and ray is not None:
            from nestvec.cluster.ray_backend import RayBackend

            cluster = RayBackend(ray)
        self.cluster = cluster

    def _folder(self, name: str) -> Path:
        return self.root / check_name(name)

    def create_collection(self, name: str, *, encoder: Encoder | str | None = BUNDLED_MODEL,
                          dim: int | None = None, codec: str = DEFAULT_CODEC, index: str = "auto",
                          exist_ok: bool = False, shards: int | None = None,
                          replicas: int | None = None) -> AnyCollection:
        """Create a collection; built in a hidden folder then renamed, so it appears whole or not at all.
        `shards` / `replicas` (either given): a collection sharded over the Ray cluster."""
        folder = self._folder(name)
        dim = check_dim(dim)
        sharded = shards is not None or replicas is not None
        if sharded:
            from nestvec.cluster.distributed import check_layout

            shards, replicas = check_layout(1 if shards is None else shards, 1 if replicas is None else replicas)
            if self.cluster is None:
                raise FailedPreconditionError("a sharded collection needs a Ray cluster: connect(path, ray='auto' "
                                              "or 'host:port', or '' for a local Ray), or serve --ray")
        with self._lock:
            if (folder / CONFIG_FILE).exists():
                if not exist_ok:
                    raise AlreadyExistsError(f"collection {name!r} already exists")
                existing = self._get_locked(name)
                differences = _differences(existing, encoder, dim, codec, index)
                if differences:
                    raise AlreadyExistsError(
                        f"collection {name!r} exists with other settings: {'; '.join(differences)}")
                return existing
            enc = load_encoder(encoder) if isinstance(encoder, str) else encoder
            staging = self.root / f".creating-{name}-{uuid.uuid4().hex[:8]}"
            try:
                Collection.create(staging, name, encoder=enc, dim=dim, codec=codec, index=index).close()
                if sharded:
                    assert shards is not None and replicas is not None
                    self._make_sharded(staging, folder, shards, replicas)
                os.rename(staging, folder)
                fsync_dir(self.root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return self._get_locked(name, enc)

    def get_collection(self, name: str, *, encoder: Encoder | None = None) -> AnyCollection:
        with self._lock:
            return self._get_locked(name, encoder)

    def _make_sharded(self, staging: Path, folder: Path, shards: int, replicas: int) -> None:
        """Turn a freshly created local collection folder into a sharded one's front door: its
        config and unfitted codec stay, its (empty) data goes; the shards hold the data."""
        from nestvec.cluster.distributed import CLUSTER_FILE, ClusterConfig

        for part in staging.iterdir():
            if part.name not in (CONFIG_FILE, "codec"):
                shutil.rmtree(part) if part.is_dir() else part.unlink()
        root = str((folder / "shards").resolve())
        write_json(staging / CLUSTER_FILE, ClusterConfig(shards, replicas, root).to_json())

    def _get_locked(self, name: str, encoder: Encoder | None = None) -> AnyCollection:
        folder = self._folder(name)
        if name not in self._open:
            if not (folder / CONFIG_FILE).exists():
                raise NotFoundError(f"collection {name!r} does not exist in {self.root}")
            self._open[name] = self._open_folder(folder, encoder)
        elif encoder is not None:
            self._open[name]._attach_encoder(encoder)
        return self._open[name]

    def _open_folder(self, folder: Path, encoder: Encoder | None) -> AnyCollection:
        from nestvec.cluster.distributed import CLUSTER_FILE, DistributedCollection

        if not (folder / CLUSTER_FILE).exists():
            return Collection(folder, encoder=encoder, max_disk_bytes=self.max_disk_bytes)
        if self.cluster is None:
            raise FailedPreconditionError(f"collection {folder.name!r} is sharded over Ray: connect(path, ray=...) "
                                          "or serve --ray to open it")
        return DistributedCollection(folder, self.cluster, encoder=encoder)

    def list_collections(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_FILE).exists())

    def drop_collection(self, name: str) -> None:
        """Rename away first (atomic disappearance), then delete the files."""
        folder = self._folder(name)
        with self._lock:
            if not (folder / CONFIG_FILE).exists():
                raise NotFoundError(f"collection {name!r} does not exist in {self.root}")
            from nestvec.cluster.distributed import CLUSTER_FILE, DistributedCollection

            opened = self._open.pop(name, None)
            if opened is None and (folder / CLUSTER_FILE).exists() and self.cluster is not None:
                opened = DistributedCollection(folder, self.cluster)
            if isinstance(opened, DistributedCollection):
                opened.destroy()
            elif opened is not None:
                opened.close("dropped")
            trash = self.root / f".dropped-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            for collection in self._open.values():
                collection.close()
            self._open.clear()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
