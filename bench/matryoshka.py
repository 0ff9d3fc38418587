"""Matryoshka fine-tuning measured: MiniLM tuned on SciFact train (qrels/train.tsv only) against
plain truncation and PCA of the base model at every prefix, on SciFact test and on Cranfield (not
trained on), and the unsupervised adaptor (fitted on each corpus alone) against the same PCA.
Trains the model into .cache/ unless it is there already; encoded corpora are cached too.

    python bench/matryoshka.py [--model .cache/minilm-mrl-scifact] [--epochs 3] [--adaptor-steps 300]
                               [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nestvec.datasets import load_qrels
from nestvec.encoders.adaptor import AdaptorConfig, fit_adaptor
from nestvec.encoders.dims import DimsReport, draw, embed_beir, eval_dims, score
from nestvec.encoders.matryoshka import MatryoshkaConfig, beir_pairs, train_matryoshka, training_card

try:
    from bench.compression import shared_data
except ImportError:  # run as a script: bench/ is sys.path[0]
    from compression import shared_data  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
DIMS = (384, 256, 128, 64, 32)


def plot(reports: list[DimsReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4.2))
    for ax, report in zip(axes, reports, strict=True):
        draw(ax, report)
    fig.suptitle("Matryoshka-tuned MiniLM (SciFact train) vs the base model truncated and PCA-rotated")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / ".cache" / "minilm-mrl-scifact")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--adaptor-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    data = shared_data()
    if not (args.model / "nestvec_training.json").exists():
        train_matryoshka("all-MiniLM-L6-v2", beir_pairs(data / "scifact", "train"), args.model,
                         MatryoshkaConfig(dims=DIMS, epochs=args.epochs))
    reports = [eval_dims(str(args.model), data / name, dims=DIMS, cache_dir=REPO / ".cache" / "embeddings",
                         label="MiniLM Matryoshka-tuned") for name in ("scifact", "cranfield")]
    adaptor_config = AdaptorConfig(dims=DIMS[1:], steps=args.adaptor_steps)
    for report in reports:  # the adaptor on top of the frozen base model, fitted on the corpus alone
        base = embed_beir("all-MiniLM-L6-v2", data / report.dataset, REPO / ".cache" / "embeddings")
        adaptor = fit_adaptor(base.corpus, adaptor_config)
        qrels = load_qrels(data / report.dataset / "qrels" / "test.tsv")
        for dim in DIMS:
            report.rows.append(score("all-MiniLM-L6-v2 + adaptor", dim, adaptor.apply(base.queries, dim),
                                     adaptor.apply(base.corpus, dim), base, qrels))
    result: dict[str, Any] = {
        "metadata": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                     "training": training_card(args.model),
                     "adaptor": {**asdict(adaptor_config), "fitted_on": "each test corpus's own documents"}},
        "datasets": {r.dataset: r.rows for r in reports}}
    for report in reports:
        print(f"\n{report.dataset} test, nDCG@10")
        print(report.table())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matryoshka.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(reports, args.out / "matryoshka.png")
    print(f"wrote {args.out / 'matryoshka.json'} and {args.out / 'matryoshka.png'}")


if __name__ == "__main__":
    main()
