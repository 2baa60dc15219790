"""ModelReward.score: one reward-model score per sample, independent of padding and micro-batching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForSequenceClassification

from rlmesh.config import ModelConfig, RewardConfig
from rlmesh.data.batch import Batch
from rlmesh.models.tiny import build_char_tokenizer, save_tiny_model, tiny_qwen2_config
from rlmesh.roles.reward import ModelReward

TOKENIZER = build_char_tokenizer()
EOS, PAD = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_qwen2_config(
        TOKENIZER, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32, num_labels=1
    )
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config).eval()
    return save_tiny_model(model, TOKENIZER, tmp_path_factory.mktemp("tiny_rm"))


def encode(text: str) -> list[int]:
    return list(TOKENIZER.encode(text, add_special_tokens=False))


def single_sequence_score(path: Path, ids: list[int]) -> float:
    """The model's score head on the last token of one unpadded sequence (pooling done by hand, not by pad id)."""
    model = Qwen2ForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
        return float(model.score(hidden)[0, -1, 0])


def test_model_reward_scores_each_sample_at_its_last_token(reward_model_path: Path, tiny_model_path: str) -> None:
    config = RewardConfig(
        _target_="rlmesh.roles.reward.ModelReward",
        model=ModelConfig(path=str(reward_model_path)),
        micro_batch_size_per_device=2,
    )
    reward = ModelReward(config, tokenizer_path=tiny_model_path, max_response_length=8, device="cpu")
    prompts = [encode("23+45="), encode("1+2="), encode("100+200="), encode("7=")]
    # The last response ends in the pad id (eos == pad in many models): it must still be scored on that token.
    responses = [[*encode("68"), EOS], encode("3"), [*encode("300"), EOS], [*encode("7"), PAD]]
    batch = Batch.from_generations(prompts, responses, pad_token_id=PAD, response_length=6)
    scored = reward.score(batch)
    expected = [single_sequence_score(reward_model_path, p + r) for p, r in zip(prompts, responses, strict=True)]
    assert scored["score"] == pytest.approx(expected, abs=1e-5)
    assert len(set(scored["score"])) == 4
    assert scored["reward_failure"] == [None] * 4
    token_level = scored["token_level_scores"]
    assert token_level.shape == (4, 6)
    for row, (response, score) in enumerate(zip(responses, expected, strict=True)):
        assert token_level[row, len(response) - 1].item() == pytest.approx(score, abs=1e-5)
        assert torch.count_nonzero(token_level[row]) == 1
