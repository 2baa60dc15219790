"""Critic and Reference in one process: value alignment, value-loss training and resume, frozen reference scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForTokenClassification

from rlmesh.algo import value_loss
from rlmesh.config import ModelConfig, OptimConfig, ReferenceConfig
from rlmesh.engine.forward import response_values
from rlmesh.roles.critic import Critic
from rlmesh.roles.reference import Reference
from rlmesh.roles.trainer import PolicyTrainer
from tests.integration.roles_fixtures import (
    actor_config,
    critic_config,
    rollout_batch,
    save_tiny_policy,
    weights_digest,
)

ROLLOUT_N = 4


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_policy(tmp_path_factory.mktemp("policy"))


def make_critic(path: str, seed: int = 0, **overrides: Any) -> Critic:
    return Critic(
        critic_config(path, **overrides), rollout_n=ROLLOUT_N, total_training_steps=20, seed=seed, device="cpu"
    )


def test_values_sit_on_response_tokens_and_match_the_head_before_each_one(policy_path: str) -> None:
    critic = make_critic(policy_path)
    batch = rollout_batch(6, seed=1)
    values = critic.compute_values(batch)
    assert values.keys() == ["values"]
    assert values["values"].shape == batch["response_mask"].shape
    model = critic.engine.model
    for row in range(len(batch)):
        prompt_mask = batch["attention_mask"][row, : batch["prompt_ids"].shape[1]].bool()
        prompt = batch["prompt_ids"][row][prompt_mask].tolist()
        response = batch["response_ids"][row][batch["response_mask"][row].bool()].tolist()
        with torch.no_grad():
            head = model(input_ids=torch.tensor([prompt + response])).logits[0, :, 0]
        expected = head[len(prompt) - 1 : len(prompt) - 1 + len(response)]
        torch.testing.assert_close(values["values"][row, : len(response)], expected, rtol=0, atol=2e-6)
        assert values["values"][row, len(response) :].abs().sum() == 0  # no value on padding, as verl


def test_the_value_head_starts_the_same_for_a_seed_and_differs_across_seeds(policy_path: str) -> None:
    def head(seed: int) -> torch.Tensor:
        return make_critic(policy_path, seed=seed).engine.model.score.weight.detach().clone()

    assert torch.equal(head(3), head(3))
    assert not torch.equal(head(3), head(4))


def test_critic_updates_move_values_towards_the_returns(policy_path: str) -> None:
    critic = make_critic(policy_path, optim=OptimConfig(lr=3e-3), cliprange_value=10.0)
    batch = rollout_batch(2 * ROLLOUT_N, seed=2)
    mask = batch["response_mask"].bool()
    history, errors = [], []
    for _ in range(4):
        batch["values"] = critic.compute_values(batch)["values"]
        errors.append((batch["values"] - batch["returns"])[mask].abs().mean().item())
        history.append(critic.update(batch))
    assert set(history[0]) == {
        "critic/vf_loss",
        "critic/vf_clipfrac",
        "critic/vpred_mean",
        "critic/grad_norm",
        "critic/lr",
        "critic/skipped_steps",
        "critic/optimizer_steps",
    }
    losses = [metrics["critic/vf_loss"] for metrics in history]
    assert losses[-1] < 0.5 * losses[0]
    assert errors[-1] < 0.7 * errors[0]


def test_the_reported_value_loss_is_the_loss_of_the_whole_batch(policy_path: str) -> None:
    critic = make_critic(policy_path, ppo_micro_batch_size_per_device=3)
    batch = rollout_batch(2 * ROLLOUT_N, seed=3)
    batch["values"] = critic.compute_values(batch)["values"]
    # Before the step the predictions equal the old values, so the loss is 0.5 × token-mean (V - R)^2.
    expected, _ = value_loss(batch["values"], batch["values"], batch["returns"], batch["response_mask"], 0.5)
    metrics = critic.update(batch)
    assert metrics["critic/vf_loss"] == pytest.approx(expected.item(), rel=1e-5)
    mask = batch["response_mask"].bool()
    assert metrics["critic/vpred_mean"] == pytest.approx(batch["values"][mask].mean().item(), rel=1e-5)
    assert metrics["critic/vf_clipfrac"] == 0.0


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_critic_gradient_accumulation_equals_the_mini_batch_gradient(
    policy_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    optim = OptimConfig(lr=1e-3, grad_clip=1e9)
    critic = make_critic(policy_path, ppo_micro_batch_size_per_device=3, optim=optim, cliprange_value=0.05)
    batch = rollout_batch(2 * ROLLOUT_N, seed=3)
    batch["values"] = critic.compute_values(batch)["values"] + 0.1 * torch.randn(batch["values"].shape)
    reference = AutoModelForTokenClassification.from_pretrained(policy_path, num_labels=1, dtype=torch.float32)
    reference.load_state_dict(critic.engine.model.state_dict())
    reference.dropout.p = 0.0
    predicted = response_values(reference, batch)
    loss, _ = value_loss(predicted, batch["values"], batch["returns"], batch["response_mask"], 0.05)
    loss.backward()
    captured: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(
        critic.engine.optimizer,
        "step",
        lambda: captured.append({n: p.grad.clone() for n, p in critic.engine.model.named_parameters()}),
    )
    critic.update(batch)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(captured[0][name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_resumed_critic_reproduces_the_next_update_bitwise(policy_path: str, tmp_path: Path) -> None:
    settings = {"ppo_epochs": 2, "optim": OptimConfig(lr=1e-3, lr_warmup_steps=1, lr_scheduler="linear")}
    critic = make_critic(policy_path, **settings)
    first, second = rollout_batch(2 * ROLLOUT_N, seed=4), rollout_batch(2 * ROLLOUT_N, seed=5)
    critic.update(first)
    critic.save_checkpoint(str(tmp_path / "ckpt"))
    expected = critic.update(second)
    expected_weights = weights_digest(dict(critic.engine.iter_full_weights()))
    resumed = make_critic(policy_path, seed=99, **settings)
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    assert resumed.update(second) == expected
    assert weights_digest(dict(resumed.engine.iter_full_weights())) == expected_weights
    assert AutoModelForTokenClassification.from_pretrained(tmp_path / "ckpt" / "critic" / "model").num_labels == 1


def test_reference_scores_as_the_initial_policy_and_stays_frozen(policy_path: str) -> None:
    reference = Reference(
        ReferenceConfig(log_prob_micro_batch_size_per_device=3), ModelConfig(path=policy_path), device="cpu"
    )
    trainer = PolicyTrainer(
        actor_config(policy_path), rollout_n=ROLLOUT_N, total_training_steps=10, seed=0, device="cpu"
    )
    batch = rollout_batch(2 * ROLLOUT_N, seed=6, temperature=0.7)
    ref = reference.compute_ref_logprobs(batch)
    assert ref.keys() == ["ref_logprobs"]
    valid = batch["response_mask"].bool()
    old = trainer.compute_logprobs(batch)["old_logprobs"]
    torch.testing.assert_close(ref["ref_logprobs"][valid], old[valid], rtol=0, atol=1e-6)
    assert ref["ref_logprobs"][~valid].abs().sum() == 0
    batch.meta["temperature"] = 1.0
    assert not torch.allclose(reference.compute_ref_logprobs(batch)["ref_logprobs"][valid], ref["ref_logprobs"][valid])
    assert not any(param.requires_grad for param in reference.model.parameters())
    assert not reference.model.training
