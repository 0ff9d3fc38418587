"""What travels to shard replicas and into their logs: writes as self-describing bytes (a JSON
header and raw float32 vectors; no pickle), and which shard an id belongs to."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from nestvec.compression import Codec
from nestvec.types import JSONDict

OpKind = Literal["upsert", "delete", "codec"]


def shard_of(ids: Sequence[str], shards: int) -> np.ndarray:
    """Each id's shard: the first 8 bytes of its BLAKE2b digest modulo `shards`. Stable across
    processes, machines and Python versions (unlike hash()), so an id never moves."""
    digests = b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids)
    return (np.frombuffer(digests, dtype=">u8") % np.uint64(shards)).astype(np.int64)


@dataclass(frozen=True)
class Op:
    """One replicated write. Upserts carry vectors already encoded by the front door (replicas
    never run the model); a codec op installs the collection's shared fitted codec."""

    kind: OpKind
    ids: list[str] = field(default_factory=list)
    texts: list[str | None] | None = None
    metadata: list[JSONDict] | None = None
    vectors: np.ndarray | None = None
    codec_files: dict[str, bytes] | None = None

    def to_bytes(self) -> bytes:
        header: JSONDict = {"kind": self.kind, "ids": self.ids, "texts": self.texts, "metadata": self.metadata}
        payload = b""
        if self.vectors is not None:
            header["shape"] = list(self.vectors.shape)
            payload = np.ascontiguousarray(self.vectors, dtype="<f4").tobytes()
        if self.codec_files is not None:
            header["files"] = {name: len(data) for name, data in self.codec_files.items()}
            payload = b"".join(self.codec_files.values())
        return json.dumps(header).encode() + b"\n" + payload

    @classmethod
    def from_bytes(cls, data: bytes) -> Op:
        head, _, payload = data.partition(b"\n")
        header = json.loads(head)
        vectors, files = None, None
        if "shape" in header:
            vectors = np.frombuffer(payload, dtype="<f4").reshape(header["shape"]).astype(np.float32)
        if "files" in header:
            files, at = {}, 0
            for name, size in header["files"].items():
                files[name] = payload[at:at + size]
                at += size
        return cls(header["kind"], header["ids"], header["texts"], header["metadata"], vectors, files)


def codec_files(codec: Codec) -> dict[str, bytes]:
    """A fitted codec as the files Codec.save writes (JSON manifest + .npy arrays)."""
    with tempfile.TemporaryDirectory(prefix="nestvec-codec-") as tmp:
        codec.save(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())}


def codec_from_files(files: dict[str, bytes]) -> Codec:
    with tempfile.TemporaryDirectory(prefix="nestvec-codec-") as tmp:
        for name, data in files.items():
            (Path(tmp) / Path(name).name).write_bytes(data)
        return Codec.load(tmp)
