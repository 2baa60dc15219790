"""Response forwards against hand loops: log-probs, entropy and values; micro-batches by count and by tokens."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlmesh.config import ModelConfig
from rlmesh.data.batch import Batch
from rlmesh.engine.forward import micro_batches, response_logprobs, response_values
from rlmesh.engine.model_io import load_value_model
from tests.integration.roles_fixtures import rollout_batch, save_tiny_policy


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_policy(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def policy(policy_path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).eval()


def real_tokens(batch: Batch, row: int) -> tuple[list[int], list[int]]:
    """(prompt, response) token ids of one row without any padding."""
    prompt = batch["prompt_ids"][row][batch["attention_mask"][row, : batch["prompt_ids"].shape[1]].bool()]
    response = batch["response_ids"][row][batch["response_mask"][row].bool()]
    return prompt.tolist(), response.tolist()


def hand_scores(model: torch.nn.Module, prompt: list[int], response: list[int], temperature: float) -> list:
    """For one unpadded sequence, token by token: (log p(response[t]), entropy) from log_softmax(logits / temp)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
    scores = []
    for t, token in enumerate(response):
        log_probs = torch.log_softmax(logits[len(prompt) - 1 + t].double() / temperature, dim=-1)
        scores.append((log_probs[token].item(), -(log_probs.exp() * log_probs).sum().item()))
    return scores


def test_response_logprobs_and_entropy_equal_a_token_by_token_loop(policy: torch.nn.Module) -> None:
    batch = rollout_batch(6, seed=1, temperature=0.7)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(policy, batch, temperature=0.7, with_entropy=True)
    assert entropy is not None
    assert logprobs.shape == entropy.shape == batch["response_mask"].shape
    assert logprobs.dtype == torch.float32
    checked = 0
    for row in range(len(batch)):
        prompt, response = real_tokens(batch, row)
        for t, (expected_logprob, expected_entropy) in enumerate(hand_scores(policy, prompt, response, 0.7)):
            assert logprobs[row, t].item() == pytest.approx(expected_logprob, abs=1e-5)
            assert entropy[row, t].item() == pytest.approx(expected_entropy, abs=1e-5)
            checked += 1
    assert checked == int(batch["response_mask"].sum()) > 10


def test_temperature_divides_the_logits(policy: torch.nn.Module) -> None:
    batch = rollout_batch(4, seed=2)
    with torch.no_grad():
        at_one, _ = response_logprobs(policy, batch)
        at_half, _ = response_logprobs(policy, batch, temperature=0.5)
    valid = batch["response_mask"].bool()
    assert not torch.allclose(at_one[valid], at_half[valid])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        response_logprobs(policy, batch, temperature=0.0)


def test_extra_padding_never_changes_per_token_results(policy: torch.nn.Module) -> None:
    batch = rollout_batch(5, seed=3)
    rows = [real_tokens(batch, row) for row in range(len(batch))]
    prompt_width, width = batch["prompt_ids"].shape[1], batch["response_ids"].shape[1]
    padded = Batch.from_generations(
        [p for p, _ in rows],
        [r for _, r in rows],
        pad_token_id=0,
        prompt_length=prompt_width + 3,
        response_length=width + 4,
    )
    with torch.no_grad():
        tight, tight_entropy = response_logprobs(policy, batch, with_entropy=True)
        loose, loose_entropy = response_logprobs(policy, padded, with_entropy=True)
        alone = [response_logprobs(policy, batch[row])[0] for row in range(len(batch))]
    assert tight_entropy is not None and loose_entropy is not None
    valid = batch["response_mask"].bool()
    torch.testing.assert_close(loose[:, :width][valid], tight[valid], rtol=0, atol=2e-6)
    torch.testing.assert_close(loose_entropy[:, :width][valid], tight_entropy[valid], rtol=0, atol=2e-6)
    torch.testing.assert_close(torch.cat(alone)[valid], tight[valid], rtol=0, atol=2e-6)


def test_values_are_the_head_output_at_the_position_before_each_response_token(policy_path: str) -> None:
    torch.manual_seed(0)
    critic = load_value_model(ModelConfig(path=policy_path), "cpu").eval()
    assert critic.dropout.p == 0.0  # a value must not depend on dropout, in train mode either
    batch = rollout_batch(5, seed=4)
    with torch.no_grad():
        values = response_values(critic, batch)
    assert values.shape == batch["response_mask"].shape
    for row in range(len(batch)):
        prompt, response = real_tokens(batch, row)
        with torch.no_grad():
            head = critic(input_ids=torch.tensor([prompt + response])).logits[0, :, 0]
        expected = head[len(prompt) - 1 : len(prompt) - 1 + len(response)]
        torch.testing.assert_close(values[row, : len(response)], expected, rtol=0, atol=2e-6)


def rows_seen(model: torch.nn.Module, run: Callable[[], Any]) -> tuple[Any, list[int]]:
    """`run()`'s result, and the row count of each input the model's forward saw meanwhile."""
    seen: list[int] = []
    forward = model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(int(kwargs["input_ids"].shape[0]))
        return forward(*args, **kwargs)

    model.forward = spy  # type: ignore[method-assign]
    try:
        return run(), seen
    finally:
        del model.forward


def test_packed_log_probs_entropy_and_gradients_equal_the_padded_ones(policy: torch.nn.Module) -> None:
    # Prompts of 1-6 tokens and responses of 1-4: packed rows hold two or three sequences each.
    batch = rollout_batch(12, seed=11, temperature=0.8)
    valid = batch["response_mask"].bool()
    results = {}
    for packed in (False, True):
        policy.zero_grad()
        (logprobs, entropy), rows = rows_seen(
            policy, lambda packed=packed: response_logprobs(policy, batch, 0.8, with_entropy=True, packed=packed)
        )
        assert entropy is not None
        assert (rows[0] < len(batch)) == packed  # packing put several sequences in a row
        (logprobs[valid].sum() + 0.1 * entropy[valid].sum()).backward()
        results[packed] = (
            logprobs.detach(),
            entropy.detach(),
            {n: p.grad.clone() for n, p in policy.named_parameters()},
        )
    policy.zero_grad()
    (padded_lp, padded_ent, padded_grads), (packed_lp, packed_ent, packed_grads) = results[False], results[True]
    torch.testing.assert_close(packed_lp[valid], padded_lp[valid], rtol=0, atol=1e-6)
    torch.testing.assert_close(packed_ent[valid], padded_ent[valid], rtol=0, atol=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_values_equal_the_padded_ones(policy_path: str) -> None:
    torch.manual_seed(0)
    critic = load_value_model(ModelConfig(path=policy_path), "cpu").eval()
    batch = rollout_batch(12, seed=12)
    valid = batch["response_mask"].bool()
    with torch.no_grad():
        padded = response_values(critic, batch)
        packed, rows = rows_seen(critic, lambda: response_values(critic, batch, packed=True))
    assert rows[0] < len(batch)
    torch.testing.assert_close(packed[valid], padded[valid], rtol=0, atol=1e-6)


def test_micro_batches_by_count_cover_every_row_once_and_gather_in_order() -> None:
    batch = rollout_batch(7, seed=5)
    parts = micro_batches(batch, 3)
    assert [len(part) for part in parts] == [3, 2, 2]
    results = [Batch({"row": part["input_ids"][:, -1:]}) for part in parts]
    torch.testing.assert_close(parts.gather(results)["row"], batch["input_ids"][:, -1:])


def test_micro_batches_by_token_budget_fit_the_budget() -> None:
    batch = rollout_batch(9, seed=6)
    lengths = batch.sequence_lengths()
    budget = int(lengths.max()) + 3
    parts = micro_batches(batch, 1, token_budget=budget)
    assert all(int(part.sequence_lengths().sum()) <= budget for part in parts)
    assert sorted(torch.cat(parts.indices).tolist()) == list(range(len(batch)))
    assert len(parts) < len(batch)  # the budget packs several rows together, not one per part
    assert math.ceil(int(lengths.sum()) / budget) <= len(parts)
    with pytest.raises(ValueError, match="raise ppo_max_token_len_per_device to at least"):
        micro_batches(batch, 1, token_budget=int(lengths.max()) - 1)
