"""Real data from ../shared/data for tests: paths, shipped embeddings, small corpus slices."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NESTVEC_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"


def shipped_embeddings(dataset: str) -> tuple[list[str], np.ndarray]:
    """Precomputed MiniLM document embeddings (ids, [n, 384]) shipped with the data."""
    folder = DATA / dataset / "minilm"
    ids = (folder / "corpus_ids.txt").read_text().split()
    return ids, np.load(folder / "corpus.npy")


def corpus_slice(dataset: str, tmp_path: Path, lines: list[int]) -> Path:
    """Copy chosen corpus lines (0-based) into a temp corpus.jsonl."""
    source = (DATA / dataset / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    out = tmp_path / f"{dataset}-slice.jsonl"
    out.write_text("\n".join(source[i] for i in lines) + "\n", encoding="utf-8")
    return out


def wiki_slice(tmp_path: Path, n: int) -> tuple[Path, Path]:
    """The first n wiki250k passages (a temp passages.jsonl.gz) and their shipped MiniLM vectors (.npy)."""
    import gzip
    from itertools import islice

    folder = DATA / "wiki250k"
    text = tmp_path / "passages.jsonl.gz"
    with gzip.open(folder / "passages.jsonl.gz", "rt", encoding="utf-8") as src, \
            gzip.open(text, "wt", encoding="utf-8") as dst:
        dst.writelines(islice(src, n))
    vectors = tmp_path / "vectors.npy"
    np.save(vectors, np.load(folder / "minilm_base150k_fp16.npy", mmap_mode="r")[:n].astype(np.float32))
    return text, vectors
