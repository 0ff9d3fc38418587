"""How a search ranks: dense vectors, BM25, or both fused.

Defaults, measured by bench/hybrid.py and chosen on SciFact's *train* queries (the test queries
only report): weighted fusion of min-max normalised scores, alpha 0.5, scored best there (nDCG@10
0.735 against 0.716 for RRF k=60, 0.660 dense) and lost less than RRF when the lexical side is far
weaker than the dense one (BM25 over titles only: 0.629 against 0.577 for RRF k=60, 0.660 dense). The
mode stays dense by default: a collection may hold vectors without texts, and a search by vector
has no words for BM25.
"""

from __future__ import annotations

import numpy as np

from nestvec.errors import invalid
from nestvec.types import Hit

SEARCH_MODES = ("dense", "lexical", "hybrid")
FUSIONS = ("rrf", "weighted")
DEFAULT_MODE, DEFAULT_FUSION, DEFAULT_RRF_K, DEFAULT_ALPHA = "dense", "weighted", 60, 0.5
FUSION_DEPTH = 100  # candidates each side brings to a hybrid fusion


def check_fusion(mode: str, fusion: str, rrf_k: int, alpha: float) -> None:
    if mode not in SEARCH_MODES:
        raise invalid("mode", f"must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
    if fusion not in FUSIONS:
        raise invalid("fusion", f"must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if isinstance(rrf_k, bool) or not isinstance(rrf_k, int | np.integer) or rrf_k < 1:
        raise invalid("rrf_k", f"must be a positive integer, got {rrf_k!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= float(alpha) <= 1.0:
        raise invalid("alpha", f"must be a number in [0, 1], got {alpha!r}")


def normalised(side: list[tuple[str, float]]) -> dict[str, float]:
    """Min-max over one side's candidates (all 1.0 when they tie)."""
    if not side:
        return {}
    values = np.array([score for _, score in side], dtype=np.float64)
    span = values.max() - values.min()
    scaled = (values - values.min()) / span if span > 0 else np.ones_like(values)
    return {key: float(v) for (key, _), v in zip(side, scaled.tolist(), strict=True)}


def fuse(dense: list[tuple[str, float]] | None, lexical: list[tuple[str, float]] | None, mode: str,
          fusion: str, rrf_k: int, alpha: float, k: int) -> list[Hit]:
    """One query's hits (without text): a side alone, or both fused; ties break by id."""
    d_rank = {key: r for r, (key, _) in enumerate(dense or [], start=1)}
    l_rank = {key: r for r, (key, _) in enumerate(lexical or [], start=1)}
    d_score, l_score = dict(dense or []), dict(lexical or [])
    if mode == "dense":
        fused = d_score
    elif mode == "lexical":
        fused = l_score
    elif fusion == "rrf":
        fused = {key: sum(1.0 / (rrf_k + ranks[key]) for ranks in (d_rank, l_rank) if key in ranks)
                 for key in d_rank.keys() | l_rank.keys()}
    else:
        d_norm, l_norm = normalised(dense or []), normalised(lexical or [])
        fused = {key: alpha * d_norm.get(key, 0.0) + (1 - alpha) * l_norm.get(key, 0.0)
                 for key in d_rank.keys() | l_rank.keys()}
    best = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]
    both = mode != "dense"
    return [Hit(key, float(score), None, {},
                dense_score=d_score.get(key) if both else None, dense_rank=d_rank.get(key) if both else None,
                lexical_score=l_score.get(key), lexical_rank=l_rank.get(key)) for key, score in best]
