"""The committed base model of the default recipe: Hugging Face layout, loadable offline, weak but non-zero accuracy."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlmesh.data.synthetic import make_task_rows
from rlmesh.models.tiny import TINY_ARITH_PATH, build_char_tokenizer, evaluate_exact_match, prompt_ids

HF_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_ARITH_PATH)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(TINY_ARITH_PATH).eval()


def test_asset_has_the_hugging_face_files_and_stays_small():
    missing = [name for name in HF_FILES if not (TINY_ARITH_PATH / name).is_file()]
    assert not missing, f"{TINY_ARITH_PATH} lacks {missing}; rebuild it with python scripts/make_base_model.py"
    size = sum(path.stat().st_size for path in TINY_ARITH_PATH.iterdir())
    assert size < 8 * 2**20, f"the committed model is {size / 2**20:.1f} MiB; it should stay a few MiB"


def test_asset_config_is_the_vllm_compatible_tiny_qwen2(model, tokenizer):
    config = model.config
    assert config.model_type == "qwen2" and config.architectures == ["Qwen2ForCausalLM"]
    assert config.hidden_size // config.num_attention_heads == config.head_dim == 64
    assert config.vocab_size == len(tokenizer) == 16
    assert config.eos_token_id == tokenizer.eos_token_id != tokenizer.pad_token_id == config.pad_token_id
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    tokenizer_config = json.loads((TINY_ARITH_PATH / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == type(tokenizer).__name__ == "Qwen2Tokenizer"


def test_asset_tokenizer_is_the_one_the_helpers_build(tokenizer):
    assert tokenizer.backend_tokenizer.to_str() == build_char_tokenizer().backend_tokenizer.to_str()
    ids = prompt_ids(tokenizer, {"prompt": [{"role": "user", "content": "23+45="}]})
    assert ids == tokenizer.encode("23+45=", add_special_tokens=False)
    assert len(ids) == 6 and tokenizer.decode(ids) == "23+45="


def test_asset_is_weak_but_not_zero_on_held_out_problems(model, tokenizer):
    rows = make_task_rows("arithmetic", 100, seed=0, split="test")
    accuracy = evaluate_exact_match(model, tokenizer, rows)
    # The build measured 25.2% on 500 of these problems; RL needs some reward to start from and room to grow.
    assert 0.05 <= accuracy <= 0.60, f"held-out exact match {accuracy:.0%} is outside [5%, 60%]"
