"""Unit-tier fixtures: the default model's tokenizer and a model description, without building a model."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm_tokenizer_json() -> str:
    """The default checkpoint's (all-MiniLM-L6-v2) tokenizer.json text, read from the installed package."""
    from core.tokenize import tokenizer_json_for
    from engine.checkpoint import load_checkpoint

    return tokenizer_json_for(load_checkpoint(None).tokenizer)


@pytest.fixture
def minilm_tokenizer(minilm_tokenizer_json: str):
    """A fresh tokenizer per test (tests may wrap its methods), truncating at MiniLM's 256 tokens."""
    from core.tokenize import Tokenizer

    return Tokenizer(minilm_tokenizer_json, 256)


@pytest.fixture
def minilm_meta():
    """A description of a built all-MiniLM-L6-v2 (what the producer needs of it), with no engine behind it."""
    from engine.model_dir import ModelMeta

    meta = ModelMeta(
        name="all-MiniLM-L6-v2",
        target="onnx",
        precision="fp32",
        dim=384,
        pooling="mean",
        normalize=True,
        max_seq_len=256,
        vocab_size=30522,
        pad_id=0,
        shape={},
        weights_hash="unit",
        tokenizer_hash="unit",
        engine_file="model.onnx",
        source="unit-test",
    )
    meta.fingerprint = meta.compute_fingerprint()
    return meta
