"""Pipelined encoding for a loaded sentence-transformers model: the GPU never waits on the tokenizer.

Plain `SentenceTransformer.encode` tokenises a batch in the calling thread, pads it, copies it and runs the
model, one step after the other: on a GPU, tokenising ~130-word passages takes longer than the model does
(MiniLM on an H100: ~1,900 passages/s in fp16). Here the texts are sorted by length and cut into batches by a
budget of padded tokens (short texts make wide batches, long ones narrow); a thread pool tokenises batches
ahead of the model with the Rust tokenizer, which releases the GIL (one copy per thread: a shared one raises
"Already borrowed" when two threads touch its settings); each batch is padded only to its own longest text,
pinned and copied without blocking; the model runs on batch i while batches i+1..i+depth are tokenised.

The features are those `Transformer.preprocess` builds for plain text (same ids, masks, prompt and
prompt_length) and go through the SentenceTransformer's own forward (pooling, normalize, dense), so the
vectors are those of `encode_query` / `encode_document`. Models whose preprocessing this does not reproduce
(chat templates, routers, query expansion, flattened flash-attention inputs, custom processor kwargs) are
refused by `unsupported_reason`, and the encoder keeps the plain path for them.
"""

from __future__ import annotations

import os
import queue
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import chain, islice
from typing import Any

import numpy as np

from nestvec.encoders.base import Kind
from nestvec.errors import invalid

# Planning guesses tokens from characters before tokenising; English WordPiece averages 4.5-5 characters a
# token, so 4 errs towards narrower batches (a batch the guess overfills is split once its tokens are known).
CHARS_PER_TOKEN_GUESS = 4
NO_TRUNCATION_ABOVE = 10**20  # transformers' LARGE_INTEGER: a model_max_length above it means "never truncate"
_DOCUMENT_PROMPTS = ("document", "passage", "corpus")  # encode_document's prompt names, in its order


@dataclass(frozen=True)
class PipelineConfig:
    """How batches are cut and tokenised.

    tokens_per_batch bounds rows x padded length of every batch (the model's work and memory per step; a
    text longer than the budget gets a batch of its own); max_rows bounds a batch of very short texts;
    `workers` threads tokenise up to `depth` batches ahead of the model (None: 1 worker on CPU, where torch
    wants the cores, else up to 8; depth twice the workers).
    """

    tokens_per_batch: int = 32768
    max_rows: int = 1024
    workers: int | None = None
    depth: int | None = None

    def __post_init__(self) -> None:
        for name in ("tokens_per_batch", "max_rows", "workers", "depth"):
            value = getattr(self, name)
            if value is None and name in ("workers", "depth"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise invalid(name, f"must be a positive integer, got {value!r}")

    @classmethod
    def for_device(cls, device: str) -> PipelineConfig:
        """GPUs want wide batches; on a CPU, narrow ones waste less on attention over long rows."""
        return cls() if device.startswith("cuda") else cls(tokens_per_batch=4096, max_rows=256)

    def threads(self, device: str) -> tuple[int, int]:
        """(workers, depth) for a device."""
        workers = self.workers or (max(1, min(8, (os.cpu_count() or 2) - 1)) if device.startswith("cuda") else 1)
        return workers, self.depth or 2 * workers


@dataclass(frozen=True)
class Batch:
    """One tokenised batch: `rows` are the positions of its texts in the caller's list (`index`: the same as a
    tensor, pinned for a GPU), `features` what the model's forward takes."""

    rows: np.ndarray
    index: Any
    features: dict[str, Any]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, padded length)."""
        rows, width = self.features["input_ids"].shape
        return int(rows), int(width)


@dataclass(frozen=True)
class _TokenSpec:
    """What `Transformer.preprocess` would have the tokenizer do for one call."""

    prompt: str
    prompt_length: int | None
    max_length: int | None  # None: no truncation
    truncation_side: str
    left_pad: bool
    pad_id: int
    pad_type_id: int
    split_special_tokens: bool
    type_ids: bool
    attention_mask: bool


def pack(lengths: np.ndarray, budget: int, max_rows: int) -> list[np.ndarray]:
    """Positions of `lengths` cut into batches, longest first, each with rows x its longest <= budget."""
    lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
    order = np.argsort(-lengths, kind="stable")
    parts: list[np.ndarray] = []
    start = 0
    while start < len(order):
        rows = min(max_rows, max(1, budget // int(lengths[order[start]])))
        parts.append(order[start:start + rows])
        start += rows
    return parts


def resolve_prompt(model: Any, kind: Kind) -> str:
    """The prompt `encode_query` / `encode_document` prepend ("" for none): a named one, else the default."""
    prompts: dict[str, str] = getattr(model, "prompts", None) or {}
    names = ("query",) if kind == "query" else _DOCUMENT_PROMPTS
    name = next((n for n in names if n in prompts), getattr(model, "default_prompt_name", None))
    return (prompts.get(name) or "") if name is not None else ""


def unsupported_reason(model: Any) -> str | None:
    """Why the pipeline cannot reproduce `model.encode_*` for this model; None when it can."""
    import sentence_transformers
    from sentence_transformers.base.modules import Transformer

    if int(sentence_transformers.__version__.split(".")[0]) < 6:
        return f"it reproduces sentence-transformers 6 preprocessing, found {sentence_transformers.__version__}"
    if getattr(model, "get_backend", lambda: "torch")() != "torch":
        return "the model is not a torch model"
    first = model[0]
    if not isinstance(first, Transformer):
        return f"its first module is a {type(first).__name__}, not a Transformer"
    tokenizer: Any = first.tokenizer
    if tokenizer is None or first.processor is not tokenizer or not getattr(tokenizer, "is_fast", False):
        return "the model has no fast (Rust) tokenizer as its processor"
    if tokenizer.pad_token_id is None:
        return "the tokenizer has no padding token"
    modalities = getattr(first, "modality_config", {"text": None})
    if "text" not in modalities or "message" in modalities:
        return "the model reads text through a chat template or not at all"
    if getattr(first, "transformer_task", "feature-extraction") != "feature-extraction":
        return f"its transformer task is {first.transformer_task!r}"
    if getattr(first, "can_flatten_inputs", False):
        return "it already skips padding (flattened flash-attention inputs)"
    if getattr(first, "query_expansion", None) is not None:
        return "it expands queries"
    extra = {k: v for k, v in (getattr(first, "processing_kwargs", None) or {}).items() if v}
    if extra and (set(extra) != {"text"} or set(extra["text"]) != {"max_length"}):
        return f"it sets processor kwargs {sorted(extra)}"
    return None


class PipelinedEncoder:
    """`encode_query` / `encode_document` for one loaded SentenceTransformer, tokenising ahead of the model."""

    def __init__(self, model: Any, config: PipelineConfig | None = None) -> None:
        reason = unsupported_reason(model)
        if reason:
            raise invalid("pipeline", f"cannot pipeline this model: {reason}")
        self.model = model
        self.config = config or PipelineConfig.for_device(str(model.device))
        self._tokenizers: queue.SimpleQueue[Any] = queue.SimpleQueue()  # per-thread copies, reused across calls

    def encode(self, texts: Sequence[str], *, kind: Kind = "document", show_progress: bool = False) -> Any:
        """[n, dim] torch tensor of sentence embeddings on the model's device, in its dtype, in the texts' order."""
        import torch
        from tqdm.auto import tqdm

        model = self.model
        device = model.device
        model.eval()
        out: torch.Tensor | None = None
        truncate_dim = getattr(model, "truncate_dim", None)
        with torch.inference_mode(), tqdm(total=len(texts), desc="Encoding", unit="text",
                                          disable=not show_progress) as bar:
            for batch in self.batches(texts, kind=kind):
                features = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                            for k, v in batch.features.items()}
                emb = model(features, task=kind)["sentence_embedding"]
                if truncate_dim:
                    emb = emb[:, :truncate_dim]
                if out is None:
                    out = emb.new_empty((len(texts), emb.shape[1]))
                out[batch.index.to(device, non_blocking=True)] = emb
                bar.update(len(batch.rows))
        if out is None:
            dim = truncate_dim or model.get_embedding_dimension() or 0
            return torch.empty((0, dim), device=device)
        return out

    def batches(self, texts: Sequence[str], *, kind: Kind = "document") -> Iterator[Batch]:
        """Tokenised batches, longest texts first, each padded to its own longest; `workers` threads keep up
        to `depth` batches ready ahead of the consumer."""
        if not texts:
            return
        spec = self._spec(kind)
        chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)) + len(spec.prompt)
        guess = chars // CHARS_PER_TOKEN_GUESS + 2
        if spec.max_length is not None:
            guess = np.minimum(guess, spec.max_length)
        plan = pack(guess, self.config.tokens_per_batch, self.config.max_rows)
        pin = str(self.model.device).startswith("cuda")
        workers, depth = self.config.threads(str(self.model.device))
        if len(plan) == 1 or (workers == 1 and depth == 1):
            for rows in plan:
                yield from self._tokenize(texts, rows, spec, pin)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="nestvec-tokenize") as pool:
            todo = iter(plan)
            pending: deque[Future[list[Batch]]] = deque(
                pool.submit(self._tokenize, texts, rows, spec, pin) for rows in islice(todo, depth))
            try:
                while pending:
                    ready = pending.popleft().result()
                    following = next(todo, None)
                    if following is not None:
                        pending.append(pool.submit(self._tokenize, texts, following, spec, pin))
                    yield from ready
            finally:
                for future in pending:
                    future.cancel()

    def _spec(self, kind: Kind) -> _TokenSpec:
        """Mirror Transformer.preprocess: processor kwargs beat the per-task length, which beats the tokenizer's."""
        first: Any = self.model[0]
        tokenizer: Any = first.tokenizer
        max_length = getattr(first, f"{kind}_length", None)
        max_length = ((getattr(first, "processing_kwargs", None) or {}).get("text") or {}).get("max_length", max_length)
        if max_length is None and tokenizer.model_max_length <= NO_TRUNCATION_ABOVE:
            max_length = int(tokenizer.model_max_length)
        names = tokenizer.model_input_names
        spec = _TokenSpec(
            prompt="", prompt_length=None, max_length=max_length, truncation_side=tokenizer.truncation_side,
            left_pad=tokenizer.padding_side == "left", pad_id=int(tokenizer.pad_token_id),
            pad_type_id=int(tokenizer.pad_token_type_id), split_special_tokens=bool(tokenizer.split_special_tokens),
            type_ids="token_type_ids" in names, attention_mask="attention_mask" in names)
        prompt = resolve_prompt(self.model, kind)
        if not prompt:
            return spec
        # Pooling(include_prompt=False) skips the prompt's tokens: their count without a closing special token.
        tok = self._borrow(spec)
        try:
            ids = tok.encode(prompt).ids
        finally:
            self._tokenizers.put(tok)
        length = len(ids) - (1 if ids and ids[-1] in set(tokenizer.all_special_ids) else 0)
        return replace(spec, prompt=prompt, prompt_length=length)

    def _borrow(self, spec: _TokenSpec) -> Any:
        """A tokenizer copy no other thread holds, set up as the HF tokenizer would set up its own."""
        try:
            tok = self._tokenizers.get_nowait()
        except queue.Empty:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(self.model[0].tokenizer.backend_tokenizer.to_str())
        tok.no_padding()
        if spec.max_length is None:
            tok.no_truncation()
        else:
            tok.enable_truncation(spec.max_length, stride=0, strategy="longest_first", direction=spec.truncation_side)
        tok.encode_special_tokens = spec.split_special_tokens
        return tok

    def _tokenize(self, texts: Sequence[str], rows: np.ndarray, spec: _TokenSpec, pin: bool) -> list[Batch]:
        """One planned batch -> tokenised batches (more than one when the character guess was too low)."""
        batch = [spec.prompt + texts[i] for i in rows]
        tok = self._borrow(spec)
        try:
            encodings = tok.encode_batch_fast(batch)
        finally:
            self._tokenizers.put(tok)
        lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
        return [self._features([encodings[i] for i in part], lengths[part], rows[part], spec, pin)
                for part in pack(lengths, self.config.tokens_per_batch, self.config.max_rows)]

    @staticmethod
    def _features(encodings: list[Any], lengths: np.ndarray, rows: np.ndarray, spec: _TokenSpec,
                  pin: bool) -> Batch:
        """Pad to the batch's longest row, as `tokenizer(..., padding=True, return_tensors="pt")` does."""
        import torch

        width = int(lengths.max())
        cols = np.arange(width)
        real = cols >= width - lengths[:, None] if spec.left_pad else cols < lengths[:, None]
        total = int(lengths.sum())
        arrays = {"input_ids": np.full(real.shape, spec.pad_id, dtype=np.int64)}
        arrays["input_ids"][real] = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int64, total)
        if spec.type_ids:
            arrays["token_type_ids"] = np.full(real.shape, spec.pad_type_id, dtype=np.int64)
            arrays["token_type_ids"][real] = np.fromiter(chain.from_iterable(e.type_ids for e in encodings),
                                                         np.int64, total)
        if spec.attention_mask:
            arrays["attention_mask"] = real.astype(np.int64)
        arrays["index"] = rows.astype(np.int64)
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        if pin:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        index = tensors.pop("index")
        features: dict[str, Any] = {**tensors, "modality": "text"}
        if spec.prompt_length is not None:
            features["prompt_length"] = spec.prompt_length
        return Batch(rows=rows, index=index, features=features)
