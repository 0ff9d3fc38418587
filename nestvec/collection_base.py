"""What every collection front shares, local or sharded: its config, its encoder (loaded on
first use, refused when it is not the model the collection was built with) and query embedding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nestvec.checks import check_vectors
from nestvec.encoders import Encoder, load_encoder
from nestvec.errors import FailedPreconditionError, invalid
from nestvec.types import CollectionConfig


class EncodedCollection:
    config: CollectionConfig
    _encoder: Encoder | None

    @property
    def name(self) -> str:
        return self.config.name

    # -- encoder -----------------------------------------------------------------------------
    def _attach_encoder(self, encoder: Encoder) -> None:
        expected = self.config.encoder
        if expected is None:
            raise FailedPreconditionError(f"collection {self.name!r} stores raw vectors and has no encoder")
        got = encoder.identity
        if got.weights_sha256 != expected.weights_sha256 or encoder.dim != expected.dim:
            raise FailedPreconditionError(
                f"encoder {got.model} ({got.weights_sha256[:12]}) differs from "
                f"collection {self.name!r}'s {expected.model} ({expected.weights_sha256[:12]})")
        if got.layers != expected.layers:
            raise FailedPreconditionError(
                f"encoder {got.model} runs {got.layers or 'all'} layers; collection {self.name!r} was built "
                f"with {expected.layers or 'all'} (its vectors would not compare)")
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            if self.config.encoder is None:
                raise FailedPreconditionError(
                    f"collection {self.name!r} has no encoder: pass vectors instead of texts")
            self._attach_encoder(load_encoder(self.config.encoder.model, layers=self.config.encoder.layers))
        assert self._encoder is not None
        return self._encoder


    def embed_queries(self, queries: str | Sequence[str] | np.ndarray | Sequence[Sequence[float]],
                      model: str | None = None) -> np.ndarray:
        """Texts are encoded with the collection's encoder; vectors are checked against it."""
        if isinstance(queries, str):
            queries = [queries]
        if isinstance(queries, Sequence) and queries and all(isinstance(q, str) for q in queries):
            return self.encoder.encode([str(q) for q in queries], kind="query")
        if model is not None and (self.config.encoder is None or not self.config.encoder.matches(model)):
            have = self.config.encoder.model if self.config.encoder else "raw vectors"
            raise FailedPreconditionError(f"query vectors come from {model!r}; collection {self.name!r} holds {have}")
        vectors = check_vectors(queries, self.config.dim, "query") if len(queries) else np.zeros((0, 0))
        if not len(vectors):
            raise invalid("queries", "empty batch")
        return vectors
