"""PolicyTrainer in one process: scoring, gradient accumulation, a learning step, checkpoints, weight export."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlmesh.algo import agg_loss, get_policy_loss, kl_loss
from rlmesh.config import OptimConfig
from rlmesh.data.batch import Batch
from rlmesh.engine.forward import response_logprobs
from rlmesh.roles.trainer import PolicyTrainer
from tests.integration.roles_fixtures import actor_config, rollout_batch, save_tiny_policy, weights_digest

ROLLOUT_N = 4


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_policy(tmp_path_factory.mktemp("policy"))


def make_trainer(path: str, seed: int = 0, total_training_steps: int = 20, **overrides: Any) -> PolicyTrainer:
    return PolicyTrainer(
        actor_config(path, **overrides),
        rollout_n=ROLLOUT_N,
        total_training_steps=total_training_steps,
        seed=seed,
        device="cpu",
    )


def training_batch(trainer: PolicyTrainer, samples: int, seed: int, temperature: float = 1.0) -> Batch:
    """A rollout batch with the trainer's own old log-probs and a made-up reference."""
    batch = rollout_batch(samples, seed=seed, temperature=temperature)
    batch["old_logprobs"] = trainer.compute_logprobs(batch)["old_logprobs"]
    batch["ref_logprobs"] = (
        batch["old_logprobs"] + 0.1 * torch.randn(batch["old_logprobs"].shape) * batch["response_mask"]
    )
    return batch


def hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def test_compute_logprobs_returns_only_the_new_fields_at_the_batch_temperature(policy_path: str) -> None:
    trainer = make_trainer(policy_path)
    batch = rollout_batch(6, seed=1, temperature=0.6)
    scored = trainer.compute_logprobs(batch)
    assert sorted(scored.keys()) == ["entropy", "old_logprobs"]
    assert scored["old_logprobs"].dtype == torch.float32
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, expected_entropy = response_logprobs(model, batch, temperature=0.6, with_entropy=True)
    assert expected_entropy is not None
    valid = batch["response_mask"].bool()
    torch.testing.assert_close(scored["old_logprobs"][valid], expected[valid], rtol=0, atol=1e-6)
    torch.testing.assert_close(scored["entropy"][valid], expected_entropy[valid], rtol=0, atol=1e-6)
    assert scored["old_logprobs"][~valid].abs().sum() == 0 and scored["entropy"][~valid].abs().sum() == 0


def full_batch_gradient(path: str, batch: Batch, mode: str, entropy_coeff: float, kl_coef: float) -> dict:
    """The gradient of the mini-batch loss computed in one piece, with rlmesh.algo's own normalisers."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    mask = batch["response_mask"]
    norm_constant = float(mask.shape[1])
    log_prob, entropy = response_logprobs(model, batch, temperature=batch.meta["temperature"], with_entropy=True)
    assert entropy is not None
    loss, _ = get_policy_loss("vanilla")(
        batch["old_logprobs"], log_prob, batch["advantages"], mask, loss_agg_mode=mode, norm_constant=norm_constant
    )
    loss = loss - entropy_coeff * agg_loss(entropy, mask, mode, norm_constant)
    loss = loss + kl_coef * kl_loss(log_prob, batch["ref_logprobs"], mask, "low_var_kl", mode, norm_constant)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# The optimizer's step is replaced by a probe, which torch's LR scheduler notices and warns about.
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize(
    ("mode", "micro", "dynamic"),
    [
        ("token-mean", 1, False),
        ("token-mean", 3, False),
        ("seq-mean-token-mean", 2, False),
        ("seq-mean-token-sum", 3, False),
        ("seq-mean-token-sum-norm", 1, False),
        ("token-mean", 1, True),
    ],
)
def test_accumulated_micro_batch_gradients_equal_the_mini_batch_gradient(
    policy_path: str, monkeypatch: pytest.MonkeyPatch, mode: str, micro: int, dynamic: bool
) -> None:
    settings = {
        "loss_agg_mode": mode,
        "ppo_micro_batch_size_per_device": micro,
        "use_dynamic_bsz": dynamic,
        "ppo_max_token_len_per_device": 10,  # a few rows per micro-batch when dynamic
        "entropy_coeff": 0.01,
        "use_kl_loss": True,
        "kl_loss_coef": 0.1,
        "optim": OptimConfig(lr=1e-3, grad_clip=1e9),  # no clipping: compare raw gradients
    }
    trainer = make_trainer(policy_path, **settings)
    batch = training_batch(trainer, 2 * ROLLOUT_N, seed=7, temperature=0.8)
    # Perturb the old log-probs so that some ratios are clipped and the clipped branch is exercised too.
    batch["old_logprobs"] = batch["old_logprobs"] + 0.3 * torch.randn(batch["old_logprobs"].shape)
    captured: list[dict[str, torch.Tensor]] = []

    def capture_instead_of_stepping(*args: Any, **kwargs: Any) -> None:
        captured.append({name: p.grad.clone() for name, p in trainer.engine.model.named_parameters()})

    monkeypatch.setattr(trainer.engine.optimizer, "step", capture_instead_of_stepping)
    trainer.update(batch)
    expected = full_batch_gradient(policy_path, batch, mode, entropy_coeff=0.01, kl_coef=0.1)
    assert len(captured) == 1
    assert set(captured[0]) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(captured[0][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_trainer_with_packed_forwards_computes_the_same_update(
    policy_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {
        "ppo_micro_batch_size_per_device": 4,
        "entropy_coeff": 0.01,
        "use_kl_loss": True,
        "kl_loss_coef": 0.1,
        "optim": OptimConfig(lr=1e-3, grad_clip=1e9),
    }
    batch = training_batch(make_trainer(policy_path, **settings), 4 * ROLLOUT_N, seed=9, temperature=0.8)
    batch["old_logprobs"] = batch["old_logprobs"] + 0.3 * torch.randn(batch["old_logprobs"].shape)
    outcomes = {}
    for packed in (False, True):
        trainer = make_trainer(policy_path, **settings)
        trainer.config.model.use_remove_padding = packed
        old = trainer.compute_logprobs(batch)["old_logprobs"]
        grads: list[dict[str, torch.Tensor]] = []
        monkeypatch.setattr(
            trainer.engine.optimizer,
            "step",
            lambda grads=grads, model=trainer.engine.model: grads.append(
                {n: p.grad.clone() for n, p in model.named_parameters()}
            ),
        )
        outcomes[packed] = (old, trainer.update(batch), grads)
    (old, metrics, grads), (packed_old, packed_metrics, packed_grads) = outcomes[False], outcomes[True]
    valid = batch["response_mask"].bool()
    torch.testing.assert_close(packed_old[valid], old[valid], rtol=0, atol=1e-6)
    assert packed_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert packed_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert len(grads) == len(packed_grads) == 2  # one optimizer step per mini-batch of 2 prompts
    for step, step_grads in enumerate(grads):
        for name, grad in step_grads.items():
            torch.testing.assert_close(packed_grads[step][name], grad, rtol=1e-5, atol=1e-6, msg=f"{step} {name}")


def test_one_update_raises_the_log_prob_of_tokens_with_positive_advantage(policy_path: str) -> None:
    trainer = make_trainer(policy_path, optim=OptimConfig(lr=1e-2))
    batch = training_batch(trainer, 2 * ROLLOUT_N, seed=8)
    batch["advantages"] = batch["response_mask"].float()  # every sampled token was good
    valid = batch["response_mask"].bool()
    before = weights_digest(trainer.export_weights() or {})
    first = trainer.update(batch)
    after = trainer.compute_logprobs(batch)["old_logprobs"]
    assert weights_digest(trainer.export_weights() or {}) != before
    assert after[valid].mean() > batch["old_logprobs"][valid].mean() + 0.05
    assert set(first) == {
        "actor/pg_loss",
        "actor/pg_clipfrac",
        "actor/pg_clipfrac_lower",
        "actor/ppo_kl",
        "actor/entropy",
        "actor/grad_norm",
        "actor/lr",
        "actor/skipped_steps",
        "actor/optimizer_steps",
    }
    assert first["actor/skipped_steps"] == 0 and first["actor/optimizer_steps"] >= 1
    assert all(isinstance(value, float) and np.isfinite(value) for value in first.values())
    # On-policy the ratio is 1, so the first PPO loss is -mean(A) = -1; the step lowers it.
    assert first["actor/pg_loss"] == pytest.approx(-1.0)
    assert first["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-7)
    second = trainer.update(batch)
    assert second["actor/pg_loss"] < first["actor/pg_loss"] - 0.05
    assert second["actor/ppo_kl"] < 0  # the new policy puts more mass on the sampled tokens than the old did


def test_rollout_correction_weights_and_bypass_rejections_reach_the_policy_loss(policy_path: str) -> None:
    batch = training_batch(make_trainer(policy_path), 2 * ROLLOUT_N, seed=8)
    batch["advantages"] = batch["response_mask"].float()
    valid = batch["response_mask"].bool()
    # Decoupled mode: on-policy the ratio is 1, so the loss is -mean(w A) = -0.5.
    weighted = Batch.merge([batch, Batch({"rollout_is_weights": 0.5 * batch["response_mask"].float()})])
    metrics = make_trainer(policy_path).update(weighted)
    assert metrics["actor/pg_loss"] == pytest.approx(-0.5)
    # Bypass mode: the old log-probs stand for the rollout's; first tokens made e times likelier under the policy
    # than under them lie outside [1/2, 2] and are rejected. They still count in the token-mean denominator.
    bypass = batch[:]
    bypass["old_logprobs"] = bypass["old_logprobs"].clone()
    bypass["old_logprobs"][:, 0] -= 1.0
    bypass.meta["rollout_correction"] = {"rollout_rs": "token", "rollout_rs_threshold": 2.0}
    metrics = make_trainer(policy_path).update(bypass)
    rejected = float(valid[:, 0].sum()) / float(valid.sum())
    assert metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(rejected)
    assert metrics["actor/pg_loss"] == pytest.approx(-(1 - rejected), rel=1e-5)
    assert metrics["rollout_corr/kl"] == pytest.approx(-rejected, rel=1e-4)  # k1: mean of log pi_rollout - log pi
    assert not any(key.endswith(("_max", "_min")) for key in metrics if key.startswith("rollout_corr/"))


def test_a_non_finite_loss_skips_every_optimizer_step_and_leaves_the_weights(policy_path: str) -> None:
    trainer = make_trainer(policy_path, optim=OptimConfig(lr=1e-2))
    batch = training_batch(trainer, 2 * ROLLOUT_N, seed=9)
    batch["advantages"] = torch.full_like(batch["advantages"], float("nan"))
    before = weights_digest(trainer.export_weights() or {})
    metrics = trainer.update(batch)
    assert metrics["actor/skipped_steps"] == metrics["actor/optimizer_steps"] >= 1
    assert not np.isfinite(metrics["actor/grad_norm"])
    assert weights_digest(trainer.export_weights() or {}) == before
    batch["advantages"] = batch["response_mask"].float()  # the next good batch trains again
    assert trainer.update(batch)["actor/skipped_steps"] == 0
    assert weights_digest(trainer.export_weights() or {}) != before


def test_update_needs_whole_mini_batches_and_the_fields_it_reads(policy_path: str) -> None:
    trainer = make_trainer(policy_path)
    batch = training_batch(trainer, 2 * ROLLOUT_N, seed=9)
    with pytest.raises(ValueError, match=r"got 6 samples, which do not split into mini-batches of 8"):
        trainer.update(batch[:6])
    del batch["advantages"]
    with pytest.raises(KeyError, match=r"PolicyTrainer.update needs batch fields \['advantages'\]"):
        trainer.update(batch)
    with pytest.raises(ValueError, match=r"strategy='zero3' is unknown"):
        make_trainer(policy_path, strategy="zero3")


def test_a_resumed_trainer_reproduces_the_next_update_bitwise(policy_path: str, tmp_path: Path) -> None:
    settings = {
        "shuffle": True,
        "ppo_epochs": 2,
        "ppo_micro_batch_size_per_device": 3,
        "entropy_coeff": 0.01,
        "use_kl_loss": True,
        "optim": OptimConfig(lr=1e-3, lr_warmup_steps=2, lr_scheduler="cosine", min_lr_ratio=0.1),
    }
    trainer = make_trainer(policy_path, **settings)
    first, second = training_batch(trainer, 4 * ROLLOUT_N, seed=10), training_batch(trainer, 4 * ROLLOUT_N, seed=11)
    trainer.update(first)
    trainer.save_checkpoint(str(tmp_path / "ckpt"))
    expected_metrics = trainer.update(second)
    expected_weights = weights_digest(trainer.export_weights() or {})
    expected_draws = (torch.rand(3), random.random(), np.random.rand())

    resumed = make_trainer(policy_path, seed=123, **settings)  # another seed: everything must come from the files
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    assert resumed.updates == 1
    assert resumed.update(second) == expected_metrics
    assert weights_digest(resumed.export_weights() or {}) == expected_weights
    draws = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]


def test_the_saved_policy_loads_in_transformers_with_its_tokenizer(policy_path: str, tmp_path: Path) -> None:
    trainer = make_trainer(policy_path)
    trainer.update(training_batch(trainer, 2 * ROLLOUT_N, seed=12))
    trainer.save_checkpoint(str(tmp_path / "ckpt"))
    folder = tmp_path / "ckpt" / "policy"
    assert (tmp_path / "ckpt" / "policy_state" / "rank0.pt").is_file()
    assert set(hf_weights(folder)) == set(hf_weights(policy_path))
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer.encode("12+3=")) == "12+3="
    batch = rollout_batch(4, seed=13)
    with torch.no_grad():
        expected, _ = response_logprobs(loaded, batch)
    valid = batch["response_mask"].bool()
    torch.testing.assert_close(trainer.compute_logprobs(batch)["old_logprobs"][valid], expected[valid])


@pytest.mark.parametrize("tied", [True, False])
def test_exported_weights_have_the_checkpoint_names_and_load_back(tmp_path: Path, tied: bool) -> None:
    path = save_tiny_policy(tmp_path / "policy", tie_word_embeddings=tied)
    trainer = make_trainer(path)
    trainer.update(training_batch(trainer, 2 * ROLLOUT_N, seed=14))
    exported = trainer.export_weights()
    assert exported is not None
    assert set(exported) == set(hf_weights(path))
    assert ("lm_head.weight" in exported) is not tied
    assert all(tensor.device.type == "cpu" and tensor.dtype == torch.float32 for tensor in exported.values())
    # A folder holding only the config and the exported tensors loads with from_pretrained, nothing missing.
    folder = tmp_path / "exported"
    AutoConfig.from_pretrained(path).save_pretrained(folder)
    save_file(exported, str(folder / "model.safetensors"))
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = rollout_batch(4, seed=15)
    with torch.no_grad():
        expected, _ = response_logprobs(loaded.eval(), batch)
    valid = batch["response_mask"].bool()
    torch.testing.assert_close(trainer.compute_logprobs(batch)["old_logprobs"][valid], expected[valid])


def test_a_batch_with_split_episodes_trains_every_row_in_the_steps_its_prompts_make(policy_path: str) -> None:
    # 2 prompts x 4 samples and 3 extra pieces of split episodes: 11 rows, one mini-batch per prompt (2 steps).
    trainer = make_trainer(policy_path, ppo_mini_batch_size=1)
    batch = training_batch(trainer, 2 * ROLLOUT_N + 3, seed=9)
    batch["advantages"] = batch["response_mask"].float()
    with pytest.raises(ValueError, match="do not split into mini-batches"):
        trainer.update(batch)  # a batch that does not say how many prompts it holds
    batch.meta["prompts"] = 2
    metrics = trainer.update(batch)
    assert metrics["actor/optimizer_steps"] == 2
    assert np.isfinite(metrics["actor/pg_loss"])
