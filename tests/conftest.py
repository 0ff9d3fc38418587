"""Shared fixtures: real data slices, the bundled encoder, temp stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nestvec.client.local import LocalClient
from nestvec.encoders import SentenceTransformerEncoder, load_encoder
from realdata import shipped_embeddings


@pytest.fixture(scope="session")
def scifact_vectors() -> tuple[list[str], np.ndarray]:
    return shipped_embeddings("scifact")


@pytest.fixture(scope="session")
def encoder() -> SentenceTransformerEncoder:
    return load_encoder()


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[LocalClient]:
    with LocalClient(tmp_path / "store") as c:
        yield c
