"""nestvec: compressed Matryoshka embeddings on disk, searchable from Python and the CLI."""

from nestvec.client import connect
from nestvec.client.aio import aconnect
from nestvec.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NestvecError,
    NotFoundError,
)
from nestvec.types import CollectionConfig, EncoderIdentity, Hit, Record
from nestvec.version import __version__

__all__ = [
    "AlreadyExistsError", "CollectionConfig", "EncoderIdentity", "FailedPreconditionError", "Hit",
    "InvalidArgumentError", "NestvecError", "NotFoundError", "Record", "__version__", "aconnect", "connect",
]
