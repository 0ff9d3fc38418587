"""A data folder of collections: create, open, list and drop them (used by the embedded client and the server)."""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from pathlib import Path

from nestvec.collection import CONFIG_FILE, Collection
from nestvec.compression import make_codec
from nestvec.encoders import BUNDLED_MODEL, Encoder, load_encoder
from nestvec.encoders.st import BUNDLED_ALIASES
from nestvec.errors import AlreadyExistsError, NotFoundError, invalid
from nestvec.fsutil import fsync_dir

DEFAULT_CODEC = "int8"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid("name", f"{name!r} is not a valid collection name (letters, digits, '_', '.', '-'; max 128)")
    return name


def _differences(existing: Collection, encoder: Encoder | str | None, dim: int | None, codec: str,
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
    """Collections are sub-folders of one data folder; each is opened once and shared."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, Collection] = {}
        self._lock = threading.Lock()

    def _folder(self, name: str) -> Path:
        return self.root / check_name(name)

    def create_collection(self, name: str, *, encoder: Encoder | str | None = BUNDLED_MODEL,
                          dim: int | None = None, codec: str = DEFAULT_CODEC, index: str = "auto",
                          exist_ok: bool = False) -> Collection:
        """Create a collection; built in a hidden folder then renamed, so it appears whole or not at all."""
        folder = self._folder(name)
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
                os.rename(staging, folder)
                fsync_dir(self.root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return self._get_locked(name, enc)

    def get_collection(self, name: str, *, encoder: Encoder | None = None) -> Collection:
        with self._lock:
            return self._get_locked(name, encoder)

    def _get_locked(self, name: str, encoder: Encoder | None = None) -> Collection:
        folder = self._folder(name)
        if name not in self._open:
            if not (folder / CONFIG_FILE).exists():
                raise NotFoundError(f"collection {name!r} does not exist in {self.root}")
            self._open[name] = Collection(folder, encoder=encoder)
        elif encoder is not None:
            self._open[name]._attach_encoder(encoder)
        return self._open[name]

    def list_collections(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_FILE).exists())

    def drop_collection(self, name: str) -> None:
        """Rename away first (atomic disappearance), then delete the files."""
        folder = self._folder(name)
        with self._lock:
            if not (folder / CONFIG_FILE).exists():
                raise NotFoundError(f"collection {name!r} does not exist in {self.root}")
            if name in self._open:
                self._open.pop(name).close("dropped")
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
