"""Text -> Matryoshka embeddings."""

from nestvec.encoders.base import Encoder, truncate_normalize
from nestvec.encoders.fast import PipelineConfig
from nestvec.encoders.st import BUNDLED_MODEL, SentenceTransformerEncoder, load_encoder

__all__ = ["BUNDLED_MODEL", "Encoder", "PipelineConfig", "SentenceTransformerEncoder", "load_encoder",
           "truncate_normalize"]
