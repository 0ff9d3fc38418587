"""Codecs: PCA / Matryoshka prefix + fp32, fp16, float8, int8 or binary codes."""

from nestvec.compression.codec import Codec
from nestvec.compression.factory import QUANTIZERS, code_size, make_codec

__all__ = ["QUANTIZERS", "Codec", "code_size", "make_codec"]
