"""The real bundled encoder: shapes, norms, Matryoshka prefixes, identity, agreement with shipped vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nestvec.datasets import document_text
from nestvec.encoders import Encoder, SentenceTransformerEncoder, truncate_normalize
from nestvec.encoders.st import SentenceTransformerEncoder as STEncoder
from nestvec.errors import InvalidArgumentError
from realdata import DATA, shipped_embeddings


def test_encode_shapes_and_unit_norm(encoder: SentenceTransformerEncoder) -> None:
    assert isinstance(encoder, Encoder)
    many = encoder.encode(["heat shields", "", "boundary layer"], kind="document")
    one = encoder.encode("heat shields", kind="query")
    assert many.shape == (3, 384) and many.dtype == np.float32 and one.shape == (384,)
    assert np.allclose(np.linalg.norm(many, axis=1), 1, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_matryoshka_prefix_is_renormalised_prefix(encoder: SentenceTransformerEncoder) -> None:
    full = encoder.encode(["a supersonic wing", "protein folding"])
    short = encoder.encode(["a supersonic wing", "protein folding"], dim=64)
    assert short.shape == (2, 64)
    assert np.allclose(short, truncate_normalize(full, 64), atol=2e-3)
    with pytest.raises(InvalidArgumentError, match="dim"):
        encoder.encode(["x"], dim=1000)


def test_matches_shipped_embeddings_on_real_documents(encoder: SentenceTransformerEncoder) -> None:
    ids, vectors = shipped_embeddings("scifact")
    lines = (DATA / "scifact" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    rows = [json.loads(line) for line in lines]
    ours = encoder.encode([document_text(r["title"], r["text"]) for r in rows])
    theirs = vectors[[ids.index(str(r["_id"])) for r in rows]]
    assert np.min(np.sum(ours * theirs, axis=1)) > 0.995


def test_identity_hashes_weights_not_paths(encoder: SentenceTransformerEncoder) -> None:
    ident = encoder.identity
    assert ident.model == "all-MiniLM-L6-v2" and ident.dim == 384 and len(ident.weights_sha256) == 64
    assert ident.matches("all-MiniLM-L6-v2") and ident.matches(ident.weights_sha256[:16])
    assert not ident.matches("all-mpnet-base-v2")


def test_fp32_and_bf16_agree(encoder: SentenceTransformerEncoder) -> None:
    fp32 = STEncoder(precision="fp32")
    bf16 = STEncoder(precision="bf16")
    texts = ["Vitamin D deficiency is linked to fractures.", "Shock waves on swept wings."]
    assert fp32.identity == bf16.identity
    assert np.min(np.sum(fp32.encode(texts) * bf16.encode(texts), axis=1)) > 0.99


def test_bad_arguments_are_named(encoder: SentenceTransformerEncoder) -> None:
    with pytest.raises(InvalidArgumentError, match="kind"):
        encoder.encode(["x"], kind="passage")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"texts\[1\]"):
        encoder.encode(["x", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="offline"):
        STEncoder("no-such-model/anywhere")
    with pytest.raises(InvalidArgumentError, match="precision"):
        STEncoder(precision="int3")  # type: ignore[arg-type]


# --- Pipelined encoding (encoders/fast.py): the same vectors as plain sentence-transformers encode ----------


def _mixed_texts() -> list[str]:
    """Real SciFact titles and abstracts of many lengths, plus empty, blank, unicode and over-long texts."""
    rows = [json.loads(line) for line in
            (DATA / "scifact" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:140]]
    texts = [r["title"] for r in rows[:120]] + [document_text(r["title"], r["text"]) for r in rows[120:]]
    long = " ".join(document_text(r["title"], r["text"]) for r in rows[:12])  # far past 256 tokens
    texts[7:7] = ["", "   ", "α-synuclein → Lewy bodies; 肺癌 ✓", long, "x"]
    return texts


def _queries() -> list[str]:
    lines = (DATA / "scifact" / "queries.jsonl").read_text(encoding="utf-8").splitlines()[:100]
    return [json.loads(line)["text"] for line in lines]


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = truncate_normalize(a), truncate_normalize(b)
    return float(np.min(np.sum(a * b, axis=1)))


@pytest.fixture(scope="module")
def fp32_plain() -> SentenceTransformerEncoder:
    return STEncoder(precision="fp32", device="cpu", pipeline=False)


def test_pipeline_matches_plain_encode_documents_and_queries(fp32_plain: SentenceTransformerEncoder) -> None:
    from nestvec.encoders.fast import PipelineConfig, PipelinedEncoder

    # a small budget and 2 workers: many batches, tokenised ahead in threads
    piped = PipelinedEncoder(fp32_plain._model, PipelineConfig(tokens_per_batch=2048, workers=2, depth=3))
    for kind, texts in (("document", _mixed_texts()), ("query", _queries())):
        plain = fp32_plain.encode(texts, kind=kind)  # type: ignore[arg-type]
        fast = piped.encode(texts, kind=kind).float().numpy()  # type: ignore[arg-type]
        assert fast.shape == (len(texts), 384)
        assert _min_cos(fast, plain) >= 0.9999, kind  # row i is text i: order restored


def test_pipelined_encoder_keeps_the_encode_contract(fp32_plain: SentenceTransformerEncoder) -> None:
    from nestvec.encoders import PipelineConfig

    piped = STEncoder(precision="fp32", device="cpu", pipeline=PipelineConfig(tokens_per_batch=1024, workers=2))
    assert piped.pipelined and not fp32_plain.pipelined
    texts = _mixed_texts()[:40]
    for dim in (None, 64):
        ours, theirs = piped.encode(texts, dim=dim), fp32_plain.encode(texts, dim=dim)
        assert ours.shape == theirs.shape == (40, dim or 384) and ours.dtype == np.float32
        assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
        assert _min_cos(ours, theirs) >= 0.9999
    one = piped.encode("heat shields", kind="query")
    assert one.shape == (384,) and piped.encode([]).shape == (0, 384)
    assert float(one @ fp32_plain.encode("heat shields", kind="query")) >= 0.9999


def test_pipeline_is_auto_on_gpu_only(encoder: SentenceTransformerEncoder) -> None:
    assert encoder.device == "cpu" and not encoder.pipelined


def test_pipeline_batches_equal_preprocess_and_respect_the_token_budget(
        fp32_plain: SentenceTransformerEncoder) -> None:
    from nestvec.encoders.fast import PipelineConfig, PipelinedEncoder

    model = fp32_plain._model
    texts = _mixed_texts()
    budget, max_rows = 3000, 64
    piped = PipelinedEncoder(model, PipelineConfig(tokens_per_batch=budget, max_rows=max_rows, workers=2))
    batches = list(piped.batches(texts, kind="document"))
    seen = np.concatenate([b.rows for b in batches])
    assert np.array_equal(np.sort(seen), np.arange(len(texts)))  # every text exactly once
    widths = [b.shape[1] for b in batches]
    assert max(widths) == model.max_seq_length == 256  # the over-long text is truncated
    for b in batches:
        rows, width = b.shape
        assert rows <= max_rows and (rows * width <= budget or rows == 1)
        theirs = model.preprocess([texts[i] for i in b.rows], task="document")
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert np.array_equal(b.features[key].numpy(), theirs[key].numpy()), key
    assert len(batches) >= 4 and min(widths) <= 32  # length buckets: short titles share wide batches


def test_pipeline_applies_prompts_like_encode_query_and_document() -> None:
    from sentence_transformers import SentenceTransformer

    from nestvec.encoders.fast import PipelineConfig, PipelinedEncoder
    from nestvec.encoders.st import resolve_model_path

    model = SentenceTransformer(str(resolve_model_path("minilm")), device="cpu", local_files_only=True,
                                prompts={"query": "query: ", "passage": "passage: "})
    model.set_pooling_include_prompt(False)  # pooling then skips the prompt's tokens: prompt_length must match
    piped = PipelinedEncoder(model, PipelineConfig(tokens_per_batch=2048, workers=2))
    texts = _mixed_texts()[:24]
    for kind, fn in (("query", model.encode_query), ("document", model.encode_document)):
        fast = piped.encode(texts, kind=kind).numpy()  # type: ignore[arg-type]
        assert _min_cos(fast, fn(texts, convert_to_numpy=True)) >= 0.9999, kind
    batch = next(piped.batches(texts, kind="query"))
    assert batch.features["prompt_length"] == 3  # [CLS] query :
    assert model.preprocess(["query: " + texts[batch.rows[0]]])["input_ids"][0].tolist() == \
        batch.features["input_ids"][0][: int(batch.features["attention_mask"][0].sum())].tolist()


def test_pipeline_runs_the_layer_cut_model() -> None:
    cut = STEncoder(precision="fp32", device="cpu", layers=3, pipeline=True)
    plain = STEncoder(precision="fp32", device="cpu", layers=3, pipeline=False)
    texts = _mixed_texts()[110:140]
    assert cut.pipelined and cut.identity == plain.identity
    assert _min_cos(cut.encode(texts), plain.encode(texts)) >= 0.9999


def test_pack_bounds_padded_tokens() -> None:
    from nestvec.encoders.fast import pack

    lengths = np.random.default_rng(0).integers(0, 300, size=1000)
    parts = pack(lengths, budget=4096, max_rows=50)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    for part in parts:
        assert len(part) <= 50 and len(part) * max(1, lengths[part].max()) <= 4096
    assert [len(p) for p in pack(np.array([5000, 10]), budget=4096, max_rows=8)] == [1, 1]


def test_pipeline_bad_arguments_are_named() -> None:
    from nestvec.encoders.fast import PipelineConfig, PipelinedEncoder, unsupported_reason

    for field, kwargs in (("tokens_per_batch", {"tokens_per_batch": 0}), ("max_rows", {"max_rows": -1}),
                          ("workers", {"workers": True}), ("depth", {"depth": 1.5})):
        with pytest.raises(InvalidArgumentError, match=field):
            PipelineConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="pipeline"):
        STEncoder(pipeline="yes")  # type: ignore[arg-type]
    not_a_transformer = [object()]
    assert "Transformer" in (unsupported_reason(not_a_transformer) or "")
    with pytest.raises(InvalidArgumentError, match="pipeline"):
        PipelinedEncoder(not_a_transformer)
