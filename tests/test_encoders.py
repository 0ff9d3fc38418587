"""The real bundled encoder: shapes, norms, Matryoshka prefixes, identity, agreement with shipped vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nestvec.datasets import document_text
from nestvec.encoders import Encoder, SentenceTransformerEncoder, truncate_normalize
from nestvec.encoders.st import SentenceTransformerEncoder as STEncoder
from nestvec.errors import InvalidArgumentError
from realdata import DATA, shipped_embeddings


def test_encode_shapes_and_unit_norm(encoder: SentenceTransformerEncoder) -> None:
    assert isinstance(encoder, Encoder)
    many = encoder.encode(["heat shields", "", "boundary layer"], kind="document")
    one = encoder.encode("heat shields", kind="query")
    assert many.shape == (3, 384) and many.dtype == np.float32 and one.shape == (384,)
    assert np.allclose(np.linalg.norm(many, axis=1), 1, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_matryoshka_prefix_is_renormalised_prefix(encoder: SentenceTransformerEncoder) -> None:
    full = encoder.encode(["a supersonic wing", "protein folding"])
    short = encoder.encode(["a supersonic wing", "protein folding"], dim=64)
    assert short.shape == (2, 64)
    assert np.allclose(short, truncate_normalize(full, 64), atol=2e-3)
    with pytest.raises(InvalidArgumentError, match="dim"):
        encoder.encode(["x"], dim=1000)


def test_matches_shipped_embeddings_on_real_documents(encoder: SentenceTransformerEncoder) -> None:
    ids, vectors = shipped_embeddings("scifact")
    lines = (DATA / "scifact" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    rows = [json.loads(line) for line in lines]
    ours = encoder.encode([document_text(r["title"], r["text"]) for r in rows])
    theirs = vectors[[ids.index(str(r["_id"])) for r in rows]]
    assert np.min(np.sum(ours * theirs, axis=1)) > 0.995


def test_identity_hashes_weights_not_paths(encoder: SentenceTransformerEncoder) -> None:
    ident = encoder.identity
    assert ident.model == "all-MiniLM-L6-v2" and ident.dim == 384 and len(ident.weights_sha256) == 64
    assert ident.matches("all-MiniLM-L6-v2") and ident.matches(ident.weights_sha256[:16])
    assert not ident.matches("all-mpnet-base-v2")


def test_fp32_and_bf16_agree(encoder: SentenceTransformerEncoder) -> None:
    fp32 = STEncoder(precision="fp32")
    bf16 = STEncoder(precision="bf16")
    texts = ["Vitamin D deficiency is linked to fractures.", "Shock waves on swept wings."]
    assert fp32.identity == bf16.identity
    assert np.min(np.sum(fp32.encode(texts) * bf16.encode(texts), axis=1)) > 0.99


def test_bad_arguments_are_named(encoder: SentenceTransformerEncoder) -> None:
    with pytest.raises(InvalidArgumentError, match="kind"):
        encoder.encode(["x"], kind="passage")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"texts\[1\]"):
        encoder.encode(["x", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="offline"):
        STEncoder("no-such-model/anywhere")
    with pytest.raises(InvalidArgumentError, match="precision"):
        STEncoder(precision="int3")  # type: ignore[arg-type]
