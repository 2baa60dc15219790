"""The tiny model's helpers: character tokenizer, chat template, Qwen2 shapes, save and reload, SFT, greedy decoding."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlmesh.data.synthetic import make_task_rows
from rlmesh.models.tiny import (
    CHARACTERS,
    EOS_TOKEN,
    FIRST_CHARACTER_ID,
    PAD_TOKEN,
    build_char_tokenizer,
    build_tiny_qwen2,
    evaluate_exact_match,
    greedy_responses,
    greedy_token_ids,
    prompt_ids,
    save_tiny_model,
    sft,
    sft_example,
)

# Small enough that building, a forward pass and a few SFT steps take well under a second on 2 cores.
SMALL = {"num_hidden_layers": 1, "intermediate_size": 64}


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_vocabulary_is_pad_eos_and_the_characters(tokenizer):
    assert len(tokenizer) == len(CHARACTERS) + 2 == 16
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == (PAD_TOKEN, 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == (EOS_TOKEN, 1)
    assert tokenizer.bos_token is None and tokenizer.unk_token is None
    assert tokenizer.encode(CHARACTERS, add_special_tokens=False) == list(range(FIRST_CHARACTER_ID, len(tokenizer)))


@pytest.mark.parametrize("text", ["23+45=68", "0", "99*9-1=890", "7+0="])
def test_each_character_is_one_token_and_decoding_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_tokens(tokenizer):
    ids = tokenizer.encode(f"68{EOS_TOKEN}", add_special_tokens=False)
    assert ids == [*tokenizer.encode("68", add_special_tokens=False), tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "68"


def test_prompts_with_characters_outside_the_vocabulary_are_rejected(tokenizer):
    # Qwen2Tokenizer drops unknown characters silently: 'What is 1+2?' would reach the model as '1+2'.
    row = make_task_rows("arithmetic", 1, seed=0, split="train", prompt_style="instruction")[0]
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        prompt_ids(tokenizer, row)


def test_chat_template_is_the_bare_prompt(tokenizer):
    messages = [{"role": "user", "content": "23+45="}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert text == "23+45="
    assert list(ids) == tokenizer.encode("23+45=", add_special_tokens=False)
    assert prompt_ids(tokenizer, {"prompt": messages}) == list(ids)


def test_sft_example_learns_only_the_answer_and_eos(tokenizer):
    row = make_task_rows("arithmetic", 1, seed=0, split="train")[0]
    input_ids, labels = sft_example(tokenizer, row)
    prompt = row["prompt"][0]["content"]
    answer = row["reward_model"]["ground_truth"]
    assert tokenizer.decode(input_ids) == f"{prompt}{answer}{EOS_TOKEN}"
    assert labels[: len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt) :] == input_ids[len(prompt) :]


def test_default_model_is_the_measured_one_million_parameter_qwen2(tokenizer):
    model = build_tiny_qwen2(tokenizer)
    config = model.config
    assert config.model_type == "qwen2"
    # head_dim 64: vLLM's CPU attention rejects 16.
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (128, 2, 64)
    assert config.vocab_size == len(tokenizer)
    assert (config.eos_token_id, config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert 1.0e6 < sum(parameter.numel() for parameter in model.parameters()) < 1.1e6
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


def test_forward_shapes(tokenizer):
    model = build_tiny_qwen2(tokenizer, **SMALL)
    input_ids = torch.randint(len(tokenizer), (3, 7))
    output = model(input_ids=input_ids, labels=input_ids)
    assert output.logits.shape == (3, 7, len(tokenizer))
    assert output.loss.shape == () and torch.isfinite(output.loss)


def test_same_seed_same_weights_and_global_rng_untouched(tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_tiny_qwen2(tokenizer, seed=5, **SMALL)
    assert torch.equal(torch.rand(1), expected_next)
    second = build_tiny_qwen2(tokenizer, seed=5, **SMALL)
    third = build_tiny_qwen2(tokenizer, seed=6, **SMALL)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(first.parameters(), third.parameters(), strict=True))


def test_head_dim_that_does_not_fit_hidden_size_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_qwen2(tokenizer, hidden_size=96)


def test_save_and_reload_with_auto_classes(tokenizer, tmp_path):
    model = build_tiny_qwen2(tokenizer, **SMALL)
    out = save_tiny_model(model, tokenizer, tmp_path / "tiny", notes="# notes\n")
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
    ):
        assert (out / name).is_file(), name
    generation_config = json.loads((out / "generation_config.json").read_text())
    # vLLM takes sampling defaults from this file, so it must not set temperature, top_p or the like.
    assert {key for key in generation_config if key != "transformers_version"} == {"eos_token_id", "pad_token_id"}

    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    # transformers 5 rebuilds every qwen2 folder's tokenizer as Qwen2Tokenizer; it must come back unchanged.
    assert type(reloaded_tokenizer) is type(tokenizer)
    assert reloaded_tokenizer.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    messages = [{"role": "user", "content": "23+45="}]
    assert prompt_ids(reloaded_tokenizer, {"prompt": messages}) == prompt_ids(tokenizer, {"prompt": messages})
    assert reloaded_tokenizer.eos_token_id == tokenizer.eos_token_id
    assert reloaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert reloaded_tokenizer.decode(reloaded_tokenizer.encode("12+3=15", add_special_tokens=False)) == "12+3=15"
    input_ids = torch.randint(len(tokenizer), (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)


def test_sft_lowers_the_loss_and_is_deterministic_for_a_seed(tokenizer):
    rows = make_task_rows("arithmetic", 256, seed=0, split="train")
    first = build_tiny_qwen2(tokenizer, **SMALL)
    losses = sft(first, tokenizer, rows, steps=20, lr=3e-3, seed=0, batch_size=16, warmup_steps=5)
    assert len(losses) == 20
    # Measured: about 2.6 over the first 5 steps (log 17 = 2.8 at random), about 1.9 over the last 5.
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5])
    second = build_tiny_qwen2(tokenizer, **SMALL)
    assert sft(second, tokenizer, rows, steps=20, lr=3e-3, seed=0, batch_size=16, warmup_steps=5) == losses
    assert not first.training


def test_greedy_decoding_batched_by_length_equals_one_prompt_at_a_time(tokenizer):
    rows = make_task_rows("arithmetic", 12, seed=0, split="test")
    model = build_tiny_qwen2(tokenizer, **SMALL)
    batched = greedy_token_ids(model, tokenizer, rows, max_new_tokens=4)
    assert batched == [greedy_token_ids(model, tokenizer, [row], max_new_tokens=4)[0] for row in rows]
    eos = tokenizer.eos_token_id
    assert all(1 <= len(ids) <= 4 and eos not in ids[:-1] for ids in batched)
    assert greedy_responses(model, tokenizer, rows, max_new_tokens=4) == [tokenizer.decode(ids) for ids in batched]
    assert 0.0 <= evaluate_exact_match(model, tokenizer, rows, max_new_tokens=4) <= 1.0
