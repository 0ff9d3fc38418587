"""Matryoshka fine-tuning and eval-dims on small real slices (SciFact): a few training steps on the
CPU, the model card, the tuned model's identity in a collection, and per-dimension evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import nestvec
from nestvec.cli import main
from nestvec.datasets import load_qrels
from nestvec.encoders import SentenceTransformerEncoder
from nestvec.encoders.dims import eval_dims, save_report
from nestvec.encoders.matryoshka import MatryoshkaConfig, Pairs, beir_pairs, read_pairs, train_matryoshka
from nestvec.encoders.st import resolve_model_path, weights_sha256
from nestvec.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from realdata import DATA

SCIFACT = DATA / "scifact"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pairs = beir_pairs(SCIFACT, "train")
    few = Pairs(pairs.queries[:16], pairs.positives[:16], pairs.source)
    config = MatryoshkaConfig(dims=(384, 64, 32), batch_size=4, max_steps=2, max_seq_length=64, seed=7)
    return train_matryoshka("all-MiniLM-L6-v2", few, tmp_path_factory.mktemp("mrl") / "model", config,
                            progress=False)


def test_training_writes_a_loadable_model_with_its_card(tuned: Path) -> None:
    card = json.loads((tuned / "nestvec_training.json").read_text())
    base = resolve_model_path("all-MiniLM-L6-v2")
    assert card["base_model"] == "all-MiniLM-L6-v2" and card["base_sha256"] == weights_sha256(base)
    assert card["steps"] == 2 and card["config"]["dims"] == [384, 64, 32] and card["config"]["seed"] == 7
    assert card["data"]["split"] == "train" and card["data"]["pairs"] == 16
    assert card["loss"] == "MatryoshkaLoss(MultipleNegativesRankingLoss)"
    encoder = SentenceTransformerEncoder(str(tuned), precision="fp32")
    base_encoder = SentenceTransformerEncoder("all-MiniLM-L6-v2", precision="fp32")
    text = "Vitamin D supplementation and fracture risk."
    tuned_vec, base_vec = encoder.encode(text), base_encoder.encode(text)
    assert tuned_vec.shape == (384,) and abs(float(np.linalg.norm(tuned_vec)) - 1) < 1e-5
    assert 0.9 < float(tuned_vec @ base_vec) < 1 - 1e-6  # trained: moved, but only two small steps
    assert encoder.identity.weights_sha256 != base_encoder.identity.weights_sha256
    # trained on 64-token cuts, but it encodes whole passages as its base does
    assert encoder._model.max_seq_length == base_encoder._model.max_seq_length == 256


def test_hard_negatives_are_mined_from_the_corpus(tmp_path: Path) -> None:
    pairs = beir_pairs(SCIFACT, "train")
    assert pairs.corpus is not None and len(pairs.corpus) > 5000
    few = Pairs(pairs.queries[:8], pairs.positives[:8], pairs.source, corpus=pairs.corpus[:64])
    config = MatryoshkaConfig(dims=(384, 64), batch_size=4, max_steps=1, max_seq_length=64, hard_negatives=1)
    out = train_matryoshka("all-MiniLM-L6-v2", few, tmp_path / "model", config, progress=False)
    card = json.loads((out / "nestvec_training.json").read_text())
    assert card["steps"] == 1 and card["config"]["hard_negatives"] == 1


def test_the_collection_records_the_tuned_model_and_refuses_the_base(tuned: Path, tmp_path: Path) -> None:
    client = nestvec.connect(tmp_path)
    col = client.create_collection("tuned", encoder=str(tuned))
    col.upsert(["a", "b"], texts=["Graphene conducts heat.", "Mice sleep more in winter."])
    assert col.info()["encoder"]["weights_sha256"] == weights_sha256(tuned)
    assert col.search("heat conduction in carbon", k=1)[0].id == "a"
    base_query = SentenceTransformerEncoder("all-MiniLM-L6-v2").encode("heat conduction in carbon", kind="query")
    with pytest.raises(FailedPreconditionError, match="all-MiniLM-L6-v2"):
        col.search(base_query, k=1, model="all-MiniLM-L6-v2")
    client.close()


def test_bad_training_input_names_the_field(tmp_path: Path) -> None:
    pairs = Pairs(["q"], ["p"])
    with pytest.raises(InvalidArgumentError, match="dims"):
        train_matryoshka("all-MiniLM-L6-v2", pairs, tmp_path / "a", MatryoshkaConfig(dims=(512, 64)))
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        train_matryoshka("all-MiniLM-L6-v2", pairs, tmp_path / "b", MatryoshkaConfig(batch_size=0))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="out"):
        train_matryoshka("all-MiniLM-L6-v2", pairs, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(NotFoundError, match="nosuch"):
        beir_pairs(SCIFACT, "nosuch")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"query": "q", "positive": "p"}\n{"query": "", "positive": "p"}\n')
    with pytest.raises(InvalidArgumentError, match=r"pairs.*:2"):
        read_pairs(bad)
    good = tmp_path / "pairs.tsv"
    good.write_text("what conducts heat\tGraphene conducts heat.\n")
    assert read_pairs(good).queries == ["what conducts heat"]
    assert main(["train-matryoshka", "--out", str(tmp_path / "c")]) == 2  # neither --beir nor --pairs


@pytest.fixture(scope="module")
def small_beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 SciFact documents and the test queries judged on them."""
    folder = tmp_path_factory.mktemp("beir")
    lines = (SCIFACT / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:300]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids = {json.loads(line)["_id"] for line in lines}
    qrels = {q: d for q, d in load_qrels(SCIFACT / "qrels" / "test.tsv").items() if set(d) & ids}
    (folder / "qrels").mkdir()
    with open(folder / "qrels" / "test.tsv", "w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid, judged in qrels.items():
            for doc, grade in judged.items():
                fh.write(f"{qid}\t{doc}\t{grade}\n")
    queries = [line for line in (SCIFACT / "queries.jsonl").read_text(encoding="utf-8").splitlines()
               if json.loads(line)["_id"] in qrels]
    (folder / "queries.jsonl").write_text("\n".join(queries) + "\n", encoding="utf-8")
    return folder


def test_eval_dims_compares_prefixes_with_truncation_and_pca(tuned: Path, small_beir: Path, tmp_path: Path) -> None:
    report = eval_dims(str(tuned), small_beir, dims=[256, 64], cache_dir=tmp_path / "cache")
    assert report.base == "all-MiniLM-L6-v2"  # read from the card
    methods = {r["method"] for r in report.rows}
    assert methods == {"model prefix", "all-MiniLM-L6-v2 truncated", "all-MiniLM-L6-v2 PCA"}
    by = {(r["method"], r["dim"]): r["ndcg@10"] for r in report.rows}
    assert all(0.3 < v <= 1 for v in by.values())
    # two small steps barely move the model: at full size it scores like its base
    assert abs(by[("model prefix", 256)] - by[("all-MiniLM-L6-v2 truncated", 256)]) < 0.03
    # PCA's leading axes keep more than the base model's first 64 coordinates
    assert by[("all-MiniLM-L6-v2 PCA", 64)] > by[("all-MiniLM-L6-v2 truncated", 64)]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # each model's embeddings cached once
    again = eval_dims(str(tuned), small_beir, dims=[256, 64], cache_dir=tmp_path / "cache")
    assert again.rows == report.rows
    json_path, png_path = save_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["rows"] == report.rows and png_path.stat().st_size > 10_000
    assert "| 64 |" in report.table()
    with pytest.raises(InvalidArgumentError, match="dims"):
        eval_dims(str(tuned), small_beir, dims=[1024], cache_dir=tmp_path / "cache")


def _neighbour_overlap(full: np.ndarray, reduced: np.ndarray, k: int = 10) -> float:
    truth = np.argsort(-(full @ full.T), axis=1)[:, 1:k + 1]
    found = np.argsort(-(reduced @ reduced.T), axis=1)[:, 1:k + 1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found, strict=True)]))


def test_the_unsupervised_adaptor_keeps_neighbours_in_short_prefixes(tmp_path: Path) -> None:
    from nestvec.encoders.adaptor import AdaptorConfig, MatryoshkaAdaptor, fit_adaptor
    from nestvec.encoders.base import truncate_normalize
    from realdata import shipped_embeddings

    _, vectors = shipped_embeddings("scifact")
    corpus = np.ascontiguousarray(vectors[:800], dtype=np.float32)
    adaptor = fit_adaptor(corpus, AdaptorConfig(dims=(64, 32), steps=60, batch_size=128, hidden=128), progress=False)
    adapted = adaptor.apply(corpus, 32)
    assert adapted.shape == (800, 32) and np.allclose(np.linalg.norm(adapted, axis=1), 1, atol=1e-5)
    # trained on the corpus alone, the 32-dim prefix keeps more of each vector's neighbours than a plain cut
    assert _neighbour_overlap(corpus, adapted) > _neighbour_overlap(corpus, truncate_normalize(corpus, 32)) + 0.02
    adaptor.save(tmp_path / "adaptor")
    again = MatryoshkaAdaptor.load(tmp_path / "adaptor")
    assert np.array_equal(again.apply(corpus[:5], 64), adaptor.apply(corpus[:5], 64)) and again.config == adaptor.config
    with pytest.raises(InvalidArgumentError, match="vectors"):
        adaptor.apply(corpus[:, :100])
    with pytest.raises(InvalidArgumentError, match="dims"):
        fit_adaptor(corpus, AdaptorConfig(dims=(512,)))


def test_a_layer_cut_encodes_with_the_first_k_layers_as_2d_training_does() -> None:
    """layers=k must give what Matryoshka2dLoss trains: the pooled hidden state after layer k."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["Vitamin D supplementation and fracture risk.", "Graphene conducts heat."]
    path = resolve_model_path("all-MiniLM-L6-v2")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).float()
    cut = SentenceTransformerEncoder("all-MiniLM-L6-v2", precision="fp32", layers=3)
    assert cut.layers == 3 and cut.total_layers == 6 and cut.identity.layers == 3
    pooled = ((hidden[3] * mask).sum(1) / mask.sum(1)).numpy()
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert np.allclose(cut.encode(texts), expected, atol=1e-5)
    whole = SentenceTransformerEncoder("all-MiniLM-L6-v2", precision="fp32", layers=6)
    assert whole.layers is None and whole.identity == SentenceTransformerEncoder("all-MiniLM-L6-v2").identity
    assert float(cut.encode(texts[0]) @ whole.encode(texts[0])) < 0.9  # a cut base model is a different space
    for bad in (0, 7, 2.5):
        with pytest.raises(InvalidArgumentError, match="layers"):
            SentenceTransformerEncoder("all-MiniLM-L6-v2", layers=bad)  # type: ignore[arg-type]


def test_a_collection_keeps_its_layer_cut_and_refuses_another(tmp_path: Path) -> None:
    client = nestvec.connect(tmp_path)
    cut = SentenceTransformerEncoder("all-MiniLM-L6-v2", layers=2)
    col = client.create_collection("fast", encoder=cut)
    col.upsert(["a", "b"], texts=["Graphene conducts heat.", "Mice sleep more in winter."])
    assert col.info()["encoder"]["layers"] == 2
    client.close()
    reopened = nestvec.connect(tmp_path).get_collection("fast")  # loads the encoder with the same cut
    assert reopened.search("heat conduction in carbon", k=1)[0].id == "a"
    assert reopened.encoder.identity.layers == 2
    with pytest.raises(FailedPreconditionError, match="layers"):
        nestvec.connect(tmp_path / "other").create_collection("x", encoder=cut)._attach_encoder(
            SentenceTransformerEncoder("all-MiniLM-L6-v2"))
    plain = nestvec.connect(tmp_path / "plain").create_collection("p")
    assert "layers" not in plain.info()["encoder"]  # whole-model configs are unchanged


@pytest.fixture(scope="module")
def tuned_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pairs = beir_pairs(SCIFACT, "train")
    few = Pairs(pairs.queries[:16], pairs.positives[:16], pairs.source)
    config = MatryoshkaConfig(dims=(384, 64), batch_size=4, max_steps=2, max_seq_length=64, seed=7, layers=True)
    return train_matryoshka("all-MiniLM-L6-v2", few, tmp_path_factory.mktemp("mrl2d") / "model", config,
                            progress=False)


def test_2d_training_and_eval_dims_per_layer_cut(tuned_2d: Path, small_beir: Path, tmp_path: Path) -> None:
    card = json.loads((tuned_2d / "nestvec_training.json").read_text())
    assert card["loss"] == "Matryoshka2dLoss(MultipleNegativesRankingLoss)" and card["config"]["layers"] is True
    report = eval_dims(str(tuned_2d), small_beir, dims=[384, 64], cache_dir=tmp_path / "cache", layers=[3])
    cut = {(r["method"], r["layers"], r["dim"]): r for r in report.rows if "layers" in r}
    assert {m for m, _, _ in cut} == {"model, both cut", "model, queries cut", "all-MiniLM-L6-v2, both cut"}
    assert {k for _, k, _ in cut} == {3, 6}  # the asked cut and the whole model beside it
    whole = {(r["method"], r["dim"]): r["ndcg@10"] for r in report.rows if "layers" not in r}
    assert cut[("model, both cut", 6, 64)]["ndcg@10"] == whole[("model prefix", 64)]
    assert cut[("all-MiniLM-L6-v2, both cut", 6, 384)]["ndcg@10"] == whole[("all-MiniLM-L6-v2 truncated", 384)]
    assert cut[("model, both cut", 3, 384)]["ndcg@10"] != whole[("model prefix", 384)]
    assert cut[("model, both cut", 3, 384)]["queries_per_s"] > 0
    assert "| layers | dims |" in report.table() and "| 3 | 64 |" in report.table()
    with pytest.raises(InvalidArgumentError, match="layers"):
        eval_dims(str(tuned_2d), small_beir, dims=[64], cache_dir=tmp_path / "cache", layers=[9])
