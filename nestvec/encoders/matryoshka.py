"""Matryoshka fine-tuning: make a sentence-transformers model whose every prefix is an embedding.

sentence-transformers' MatryoshkaLoss around MultipleNegativesRankingLoss (in-batch negatives,
optionally mined hard negatives), trained by its SentenceTransformerTrainer on (query, positive)
pairs from a BEIR split or a pairs file. The output is an ordinary model folder the encoder loads by
path, with `nestvec_training.json` recording what made it.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nestvec.datasets import iter_corpus, load_qrels, load_queries
from nestvec.encoders.st import BUNDLED_ALIASES, BUNDLED_MODEL, resolve_model_path, weights_sha256
from nestvec.errors import NotFoundError, invalid
from nestvec.fsutil import hash_file, write_json

CARD = "nestvec_training.json"
DEFAULT_DIMS = (384, 256, 128, 64, 32)


@dataclass(frozen=True)
class MatryoshkaConfig:
    """Saved in the model's card, beside the weights it describes."""

    dims: tuple[int, ...] = DEFAULT_DIMS
    epochs: float = 3.0
    batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    seed: int = 42
    max_steps: int | None = None        # stop early (tests, quick tries)
    hard_negatives: int = 0             # negatives per pair mined with the base model (0: in-batch only)
    max_seq_length: int | None = 256    # tokens kept per text while training
    layers: bool = False                # 2D Matryoshka (Matryoshka2dLoss): earlier layers usable too
    device: str | None = None

    def check(self) -> MatryoshkaConfig:
        if not self.dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.dims):
            raise invalid("dims", f"must be positive integers, got {list(self.dims)}")
        for name in ("batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and name == "batch_size"):
                raise invalid(name, f"must be a positive integer, got {value!r}")
        if not self.epochs > 0 or not self.learning_rate > 0:
            raise invalid("epochs" if not self.epochs > 0 else "learning_rate", "must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise invalid("max_steps", f"must be positive, got {self.max_steps}")
        if self.hard_negatives < 0:
            raise invalid("hard_negatives", f"must be >= 0, got {self.hard_negatives}")
        return self


@dataclass(frozen=True)
class Pairs:
    """(query, positive passage) training pairs and where they came from (for the card)."""

    queries: list[str]
    positives: list[str]
    source: dict[str, Any] = field(default_factory=dict)
    corpus: list[str] | None = None  # where hard negatives are mined (a BEIR corpus); else the positives

    def __len__(self) -> int:
        return len(self.queries)


def _file_sha256(path: Path) -> str:
    return str(hash_file(hashlib.sha256(), path).hexdigest())


def beir_pairs(folder: Path | str, split: str = "train") -> Pairs:
    """Every judged-relevant (query, document) of a BEIR split: `qrels/<split>.tsv`."""
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        raise NotFoundError(f"{qrels_path}: no such file (split {split!r} of {folder})")
    qrels = load_qrels(qrels_path)
    queries = load_queries(folder / "queries.jsonl")
    docs = {d.id: d.text for d in iter_corpus(folder / "corpus.jsonl")}
    out_q, out_p = [], []
    for qid, judged in qrels.items():
        for doc, grade in judged.items():
            if grade > 0 and qid in queries and docs.get(doc):
                out_q.append(queries[qid])
                out_p.append(docs[doc])
    if not out_q:
        raise invalid("split", f"{qrels_path} yields no (query, relevant document) pair")
    return Pairs(out_q, out_p, {"beir": str(folder), "split": split, "qrels_sha256": _file_sha256(qrels_path)},
                 corpus=[text for text in docs.values() if text])


def read_pairs(path: Path | str) -> Pairs:
    """A pairs file: JSONL with `query` and `positive`, or TSV with those two columns."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path}: no such file")
    queries, positives = [], []
    with open(path, encoding="utf-8", newline="") as fh:
        if path.suffix in (".jsonl", ".json"):
            rows: Any = (json.loads(line) for line in fh if line.strip())
        else:
            rows = ({"query": r[0], "positive": r[1]} if len(r) >= 2 else {} for r in csv.reader(fh, delimiter="\t"))
        for number, row in enumerate(rows, start=1):
            query, positive = row.get("query"), row.get("positive")
            if not isinstance(query, str) or not isinstance(positive, str) or not query.strip() or not positive.strip():
                raise invalid("pairs", f"{path}:{number}: needs a non-empty query and positive")
            queries.append(query)
            positives.append(positive)
    if not queries:
        raise invalid("pairs", f"{path} holds no pairs")
    return Pairs(queries, positives, {"pairs": str(path), "sha256": _file_sha256(path)})


def train_matryoshka(base: str, pairs: Pairs, out: Path | str, config: MatryoshkaConfig | None = None,
                     *, progress: bool = True) -> Path:
    """Fine-tunes `base` so that each of `config.dims` is a usable prefix; returns the model folder."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import Matryoshka2dLoss, MatryoshkaLoss, MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers  # (moved in 6.x; the old path is what 3.x-5.x have)
    from transformers.utils import logging as hf_logging

    config = (config or MatryoshkaConfig()).check()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise invalid("out", f"{out} exists and is not empty")
    base_path = resolve_model_path(base)
    hf_logging.set_verbosity_error()
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = SentenceTransformer(str(base_path), device=device, local_files_only=True)
    full = int(model.get_embedding_dimension() or 0)
    if max(config.dims) > full:
        raise invalid("dims", f"{max(config.dims)} is more than the model's {full} dimensions")
    serving_length = model.max_seq_length
    if config.max_seq_length:
        model.max_seq_length = config.max_seq_length
    dims = sorted(set(config.dims), reverse=True)
    data = Dataset.from_dict({"anchor": pairs.queries, "positive": pairs.positives})
    if config.hard_negatives:
        from sentence_transformers.util import mine_hard_negatives

        # skip the 5 nearest (often unjudged positives), take the next ones as negatives
        data = mine_hard_negatives(data, model, corpus=pairs.corpus, num_negatives=config.hard_negatives,
                                   range_min=5, range_max=50,
                                   sampling_strategy="top", batch_size=64, use_faiss=True, verbose=False,
                                   output_format="triplet")
    inner = MultipleNegativesRankingLoss(model)
    loss = Matryoshka2dLoss(model, inner, dims) if config.layers else MatryoshkaLoss(model, inner, dims)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nestvec-train-") as scratch:
        args = SentenceTransformerTrainingArguments(
            output_dir=scratch, num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate, warmup_ratio=config.warmup_ratio, seed=config.seed,
            data_seed=config.seed, max_steps=config.max_steps or -1, save_strategy="no", report_to="none",
            logging_steps=10, disable_tqdm=not progress,
            batch_sampler=BatchSamplers.NO_DUPLICATES,  # a duplicate in a batch would be its own false negative
            bf16=False, fp16=device.startswith("cuda"), dataloader_drop_last=True)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
        result = trainer.train()
        steps = int(trainer.state.global_step)
    model.max_seq_length = serving_length  # the training cut is a training knob: encode as the base did
    model.save(str(out))
    card = {
        "base_model": BUNDLED_MODEL if base in BUNDLED_ALIASES else str(base),
        "base_sha256": weights_sha256(base_path),
        "data": {**pairs.source, "pairs": len(pairs)},
        "config": {**asdict(config), "dims": dims},
        "loss": f"{'Matryoshka2dLoss' if config.layers else 'MatryoshkaLoss'}(MultipleNegativesRankingLoss)",
        "steps": steps,
        "train_loss": round(float(result.training_loss), 5),
        "seconds": round(time.perf_counter() - started, 1),
        "device": device,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_json(out / CARD, card)
    return out


def training_card(folder: Path | str) -> dict[str, Any] | None:
    """The card a nestvec-trained model folder carries, if any."""
    path = Path(folder) / CARD
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def parse_dims(text: str | Sequence[int], field: str = "dims") -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in (text.split(",") if isinstance(text, str) else text) if str(d).strip())
    except ValueError:
        raise invalid(field, f"must be comma-separated integers, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise invalid(field, f"must be positive integers, got {text!r}")
    return dims
