"""Spec strings -> codecs, stage by stage (like faiss's index_factory).

Grammar: [mrl<D>|pca<D>|mrl<P>%|pca<P>%] "+" <quantizer> ["+rescore" [":" <quantizer>]]
quantizers: fp32 fp16 fp8 (= fp8e4m3) fp8e5m2 int8 binary.  Examples: "fp8", "pca192+fp8",
"mrl128+int8", "binary+rescore" (sign bits scanned, fp32 kept on disk for rescoring).
"""

from __future__ import annotations

import re

from nestvec.compression.base import Quantizer, Transform
from nestvec.compression.codec import Codec
from nestvec.compression.scalar import (
    FLOAT8_DTYPES,
    BinaryQuantizer,
    Float8Quantizer,
    FloatQuantizer,
    Int8Quantizer,
)
from nestvec.compression.transforms import IdentityTransform, MatryoshkaTransform, PCATransform
from nestvec.errors import invalid

QUANTIZERS = ("fp32", "fp16", "fp8", "fp8e4m3", "fp8e5m2", "int8", "binary")
_TRANSFORM = re.compile(r"^(mrl|pca)(\d+)(%?)$")


def make_quantizer(name: str, dim: int) -> Quantizer:
    if name in ("fp32", "fp16"):
        return FloatQuantizer(name, dim)
    if name in FLOAT8_DTYPES:
        return Float8Quantizer(name, dim)
    if name == "int8":
        return Int8Quantizer(dim)
    if name == "binary":
        return BinaryQuantizer(dim)
    raise invalid("codec", f"unknown quantizer {name!r}; expected one of {', '.join(QUANTIZERS)}")


def _make_transform(token: str, dim: int) -> Transform:
    match = _TRANSFORM.match(token)
    if match is None:
        raise invalid("codec", f"unknown stage {token!r}; expected mrl<D>, pca<D> or a quantizer")
    kind, number, percent = match.group(1), int(match.group(2)), match.group(3)
    out_dim = max(1, round(dim * number / 100)) if percent else number
    return MatryoshkaTransform(dim, out_dim) if kind == "mrl" else PCATransform(dim, out_dim)


def make_codec(spec: str, dim: int) -> Codec:
    """Parse `spec` for vectors of `dim` dimensions; the codec's .spec is the canonical form."""
    if not isinstance(spec, str) or not spec.strip():
        raise invalid("codec", "spec must be a non-empty string such as 'fp8' or 'pca192+fp8'")
    if dim < 1:
        raise invalid("dim", f"must be positive, got {dim}")
    tokens = [t.strip().lower() for t in spec.split("+")]
    rescore: Codec | None = None
    if tokens[-1].startswith("rescore"):
        _, _, name = tokens.pop().partition(":")
        rescore = make_codec(name or "fp32", dim)
        if rescore.rescore is not None or not isinstance(rescore.transform, IdentityTransform):
            raise invalid("codec", "rescore takes a single quantizer, e.g. rescore:fp16")
    if len(tokens) == 1:
        transform: Transform = IdentityTransform(dim)
    elif len(tokens) == 2:
        transform = _make_transform(tokens[0], dim)
    else:
        raise invalid("codec", f"{spec!r} has too many stages: at most one transform, one quantizer, rescore")
    quantizer = make_quantizer(tokens[-1], transform.out_dim)
    canonical = "+".join(
        ([] if transform.name == "identity" else [f"{transform.name}{transform.out_dim}"])
        + [tokens[-1]]
        + ([f"rescore:{rescore.spec}"] if rescore else [])
    )
    return Codec(canonical, dim, transform, quantizer, rescore)


def code_size(spec: str, dim: int) -> int:
    """Bytes per vector scanned at search time for `spec` on `dim`-dimensional vectors."""
    return make_codec(spec, dim).bytes_per_vector
