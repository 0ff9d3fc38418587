"""Running top-k over score blocks, faiss-style: (scores, rows) padded with -inf / -1."""

from __future__ import annotations

import numpy as np


def merge_topk(best_scores: np.ndarray, best_rows: np.ndarray, block: np.ndarray, start: int,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold one [nq, b] block of scores (rows start..start+b) into the running [nq, k] best."""
    nq, width = block.shape
    take = min(k, width)
    if take < width:
        part = np.argpartition(-block, take - 1, axis=1)[:, :take]
    else:
        part = np.broadcast_to(np.arange(width), (nq, width))
    cand_scores = np.concatenate([best_scores, np.take_along_axis(block, part, axis=1)], axis=1)
    cand_rows = np.concatenate([best_rows, part + start], axis=1)
    # Sort by score desc, then row asc, so equal scores come out in a stable order.
    order = np.lexsort((cand_rows, -cand_scores), axis=1)[:, :k]
    return np.take_along_axis(cand_scores, order, axis=1), np.take_along_axis(cand_rows, order, axis=1)


def empty_topk(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def rerank(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of [nq, c] candidate (scores, rows); rows of -1 are padding and never win."""
    if scores.shape[1] < k:  # fewer candidates than k: pad, so results are always [nq, k]
        pad_scores, pad_rows = empty_topk(len(scores), k - scores.shape[1])
        scores, rows = np.concatenate([scores, pad_scores], axis=1), np.concatenate([rows, pad_rows], axis=1)
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return finalize(np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1))


def finalize(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of masked-out (-inf) slots become -1, as faiss pads."""
    rows = np.where(np.isneginf(scores), -1, rows)
    return scores, rows
