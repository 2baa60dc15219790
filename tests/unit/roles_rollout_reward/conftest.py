"""Fixtures for the rollout and reward role tests: a tiny random Qwen2 with the char tokenizer, saved once a session."""

from __future__ import annotations

import pytest

from rlmesh.models.tiny import build_char_tokenizer, build_tiny_qwen2, save_tiny_model

# Small enough for 2 shared cores; initializer_range 0.3 (not 0.02) makes next-token distributions peaked, so greedy
# argmax is far from ties and samples vary in length (the eos is sometimes likely, sometimes not).
TINY_TEST_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "initializer_range": 0.3,
}


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, seed=0, **TINY_TEST_MODEL)
    return str(save_tiny_model(model, tokenizer, tmp_path_factory.mktemp("tiny_qwen2")))
