"""RuleReward.score: decoding, score placement, failures, extras, the overlong penalty and the shard helpers."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from rlmesh.config import CustomRewardFunctionConfig, OverlongBufferConfig, RewardConfig
from rlmesh.data.batch import Batch
from rlmesh.models.tiny import build_char_tokenizer
from rlmesh.roles.reward import RuleReward, gather_scores, place_scores, split_for_scoring

TOKENIZER = build_char_tokenizer()
EOS = TOKENIZER.eos_token_id

USER_REWARD = textwrap.dedent(
    """
    import time

    def compute_score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):
        if solution_str == "1":
            raise RuntimeError("this scorer breaks on '1'")
        if solution_str == "2":
            time.sleep(30)
        return {"score": float(solution_str == ground_truth) + bonus, "length": len(solution_str)}
    """
)


def encode(text: str) -> list[int]:
    return list(TOKENIZER.encode(text, add_special_tokens=False))


def arithmetic_batch(responses: list[list[int]], truths: list[str], width: int | None = None) -> Batch:
    prompts = [encode("23+45=")] * len(responses)
    return Batch.from_generations(
        prompts,
        responses,
        pad_token_id=TOKENIZER.pad_token_id,
        response_length=width,
        non_tensors={
            "data_source": ["arithmetic"] * len(responses),
            "ground_truth": truths,
            "extra_info": [{"index": i} for i in range(len(responses))],
        },
    )


def make_reward(tiny_model_path: str, max_response_length: int = 8, **config: Any) -> RuleReward:
    config.setdefault("num_workers", 1)
    return RuleReward(RewardConfig(**config), tokenizer_path=tiny_model_path, max_response_length=max_response_length)


def test_scores_sit_on_the_last_response_token(tiny_model_path: str) -> None:
    reward = make_reward(tiny_model_path)
    responses = [[*encode("68"), EOS], [*encode("67"), EOS], encode("68"), [], [*encode("6"), EOS, EOS]]
    batch = arithmetic_batch(responses, ["68"] * 5, width=6)
    # The last one's second eos lies beyond its real tokens (its attention) and its mask: not part of the response.
    batch["response_mask"][4, 2] = 0
    batch["attention_mask"][4, -6 + 2] = 0
    scored = reward.score(batch)
    expected_scores = [1.0, 0.0, 1.0, 0.0, 0.0]
    assert scored["score"] == expected_scores
    assert scored["acc"] == [True, False, True, False, False]
    assert scored["pred"] == ["68", "67", "68", "", "6"]  # special tokens are skipped when decoding
    assert scored["reward_failure"] == [None] * 5
    assert scored.meta["reward_extra_keys"] == ["acc", "pred"]
    token_level = scored["token_level_scores"]
    assert token_level.dtype == torch.float32 and token_level.shape == (5, 6)
    last_positions = [2, 2, 1, 0, 1]  # the empty response carries its score at position 0
    expected = torch.zeros(5, 6)
    expected[torch.arange(5), torch.tensor(last_positions)] = torch.tensor(expected_scores)
    assert torch.equal(token_level, expected)
    assert token_level[0, 2] == 1.0 and token_level[2, 1] == 1.0
    reward.close()


def test_errors_and_timeouts_get_the_fallback_and_are_marked(tiny_model_path: str, tmp_path: Path) -> None:
    reward_file = tmp_path / "user_reward.py"
    reward_file.write_text(USER_REWARD)
    reward = make_reward(
        tiny_model_path,
        num_workers=2,
        timeout_s=0.5,
        fallback_score=-1.0,
        custom_reward_function=CustomRewardFunctionConfig(path=str(reward_file), name="compute_score"),
        reward_kwargs={"bonus": 0.25},
    )
    # The user's function sees '68', not '68<|endoftext|>': special tokens are skipped when decoding.
    responses = [[*encode("68"), EOS], encode("1"), encode("2"), encode("5")]
    scored = reward.score(arithmetic_batch(responses, ["68", "68", "68", "5"]))
    assert scored["reward_failure"] == [None, "error", "timeout", None]
    assert scored["score"] == [1.25, -1.0, -1.0, 1.25]
    assert scored["length"] == [2, None, None, 1]
    assert scored["token_level_scores"][:, 0].tolist() == [0.0, -1.0, -1.0, 1.25]
    reward.close()


def test_overlong_penalty_uses_the_response_length(tiny_model_path: str) -> None:
    reward = make_reward(
        tiny_model_path,
        max_response_length=8,
        overlong_buffer=OverlongBufferConfig(enable=True, len=4, penalty_factor=1.0),
    )
    lengths = [3, 4, 6, 8]
    responses = [[*encode("6" * (length - 1)), EOS] for length in lengths]
    scored = reward.score(arithmetic_batch(responses, ["6" * (length - 1) for length in lengths]))
    penalties = [0.0, 0.0, -0.5, -1.0]  # zero up to 8 - 4 tokens, then linear to -1 at 8
    assert scored["overlong_reward"] == penalties
    assert scored["overlong"] == [False, False, True, True]
    assert scored.meta["reward_extra_keys"] == ["acc", "pred", "overlong_reward", "overlong"]
    assert scored["score"] == [1.0] * 4  # the scorer's own score, before the penalty (as verl logs it)
    sums = scored["token_level_scores"].sum(dim=-1).tolist()
    assert sums == pytest.approx([1.0 + penalty for penalty in penalties])
    reward.close()
    with pytest.raises(ValueError, match=r"overlong_buffer\.len"):
        make_reward(tiny_model_path, overlong_buffer=OverlongBufferConfig(enable=True, len=0))


def test_rule_reward_takes_its_config_as_hydra_gives_it(tiny_model_path: str, tmp_path: Path) -> None:
    reward_file = tmp_path / "user_reward.py"
    reward_file.write_text(USER_REWARD)
    config = OmegaConf.structured(
        RewardConfig(
            num_workers=1,
            custom_reward_function=CustomRewardFunctionConfig(path=str(reward_file), name="compute_score"),
            reward_kwargs={"bonus": 0.5},
            overlong_buffer=OverlongBufferConfig(enable=True, len=4, penalty_factor=1.0),
        )
    )
    reward = RuleReward(config, tokenizer_path=tiny_model_path, max_response_length=8)
    scored = reward.score(arithmetic_batch([encode("5")], ["5"]))
    assert scored["score"] == [1.5] and scored["overlong_reward"] == [0.0]
    reward.close()


def test_unknown_data_source_and_missing_fields_fail_clearly(tiny_model_path: str) -> None:
    reward = make_reward(tiny_model_path)
    batch = arithmetic_batch([encode("68")], ["68"])
    batch["data_source"] = ["nope"]
    with pytest.raises(LookupError, match="no built-in reward for data_source 'nope'"):
        reward.score(batch)
    del batch["ground_truth"]
    batch["data_source"] = ["arithmetic"]
    with pytest.raises(KeyError, match="ground_truth"):
        reward.score(batch)
    reward.close()


def test_shard_helpers_split_without_padding_and_fill_missing_extras() -> None:
    batch = arithmetic_batch([encode("1")] * 5, ["1"] * 5)
    parts = split_for_scoring(3, batch)
    assert [len(args[0]) for args, _ in parts] == [2, 2, 1]
    first = Batch(
        {"token_level_scores": torch.ones(2, 1)},
        {"score": [1.0, 1.0], "acc": [True, False]},
        {"reward_extra_keys": ["acc"]},
    )
    # Every sample of this part failed, so its scorer reported no 'acc'.
    second = Batch({"token_level_scores": torch.zeros(1, 1)}, {"score": [0.0]}, {"reward_extra_keys": []})
    gathered = gather_scores([first, second])
    assert gathered["acc"] == [True, False, None]
    assert gathered.meta["reward_extra_keys"] == ["acc"]
    assert gathered["token_level_scores"][:, 0].tolist() == [1.0, 1.0, 0.0]


def test_place_scores_needs_a_response_position() -> None:
    with pytest.raises(ValueError, match="width 0"):
        place_scores(torch.ones(2), torch.zeros(2, dtype=torch.long), 0)


def test_close_stops_the_scoring_processes(tiny_model_path: str) -> None:
    reward = make_reward(tiny_model_path, num_workers=2)
    reward.score(arithmetic_batch([encode("68")] * 3, ["68"] * 3))
    processes = [worker.process for worker in reward.scorer._workers]
    assert len(processes) == 2 and all(process.poll() is None for process in processes)
    reward.close()
    assert all(process.poll() is not None for process in processes)


def test_a_multi_turn_response_is_read_whole_and_scored_on_its_last_token_whatever_was_sampled(tiny_model_path: str):
    # The model sampled "6", a tool appended "=" (mask 0), then the model sampled "8" and eos: the scorer reads
    # "6=8" and the score lands on eos, the last response token, not on the last of the sampled count (3).
    reward = make_reward(tiny_model_path)
    response = [*encode("6=8"), EOS]
    batch = Batch.from_generations(
        [encode("23+45=")],
        [response],
        pad_token_id=TOKENIZER.pad_token_id,
        response_length=6,
        non_tensors={"data_source": ["arithmetic"], "ground_truth": ["6=8"], "extra_info": [None]},
        response_masks=[[1, 0, 1, 1]],
    )
    assert batch["response_mask"].tolist() == [[1, 0, 1, 1, 0, 0]]
    scored = reward.score(batch)
    assert scored["score"] == [1.0]
    assert scored["token_level_scores"].tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]]


def test_an_environments_reward_is_the_score_and_the_function_scores_the_episodes_without_one(tiny_model_path: str):
    from rlmesh.metrics import validation_metrics

    reward = make_reward(tiny_model_path)
    # Row 0's environment rewarded 1 a response the function would score 0; row 1's gave none, so it is read.
    batch = arithmetic_batch([[*encode("67"), EOS], [*encode("68"), EOS], [*encode("68"), EOS]], ["68"] * 3, width=4)
    batch["env_reward"] = [1.0, None, 0.0]
    scored = reward.score(batch)
    assert scored["score"] == [1.0, 1.0, 0.0]
    assert scored["acc"] == [None, True, None]  # the function's extras, for the rows it scored
    assert scored["token_level_scores"][:, 2].tolist() == [1.0, 1.0, 0.0]
    # Validation takes a row's accuracy where the function gave one, else its score.
    metrics = validation_metrics(["arithmetic"] * 3, scored["score"], scored["acc"], n=1)
    assert metrics["val-core/arithmetic/acc/mean@1"] == pytest.approx(2 / 3)
    reward.close()
