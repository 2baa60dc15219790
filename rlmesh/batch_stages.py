"""The step's whole-batch stages as pure functions, run where the data is (the mesh's store worker), not in the loop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlmesh.algo import apply_kl_penalty, get_advantage_estimator, rollout_correction
from rlmesh.data import Batch
from rlmesh.envs import episode_metrics
from rlmesh.metrics import data_metrics, reward_metrics, rollout_probs_diff_metrics, staleness_metrics


@dataclass(frozen=True)
class Layout:
    """How generations become a batch: the padding token and, when fixed, the prompt and response widths."""

    pad_token_id: int
    prompt_length: int | None
    response_length: int | None
    temperature: float


def assemble_generations(
    samples: Sequence[Any], prompts: Mapping[str, Sequence[Any]], group_sizes: Sequence[int], layout: Layout
) -> tuple[Batch, None]:
    """The step batch from each prompt's samples (in prompt order, group_sizes[i] of prompt i: n, or more where a
    multi-turn episode split into several samples): padded tensors as Batch.from_generations lays them out, each of
    the prompts' fields (one value per prompt) repeated over its samples, and each sample's weight_version."""
    # Multi-turn samples carry a response mask of their own; custom rollouts' samples may lack the field.
    masks = [getattr(s, "response_mask", None) for s in samples]
    episodes = [getattr(s, "episode", None) for s in samples]
    # Episodes' columns: the environment's rewards (the reward role takes them) and each episode's stats.
    multi_turn = (
        {"env_reward": [getattr(s, "env_reward", None) for s in samples], "episode": episodes}
        if any(e is not None for e in episodes)
        else {}
    )
    batch = Batch.from_generations(
        [s.prompt_ids for s in samples],
        [s.response_ids for s in samples],
        [s.logprobs for s in samples],
        pad_token_id=layout.pad_token_id,
        prompt_length=layout.prompt_length,
        response_length=layout.response_length,
        non_tensors={
            key: [v for v, size in zip(values, group_sizes, strict=True) for _ in range(size)]
            for key, values in prompts.items()
        }
        | {
            "weight_version": [s.weight_version for s in samples],
            # None where a custom rollout's samples do not record it: staleness_metrics reads it as weight_version
            "last_weight_version": [getattr(s, "last_weight_version", None) for s in samples],
        }
        | multi_turn,
        # the step's prompts: with split episodes a batch has more rows than prompts × n (mini-batches count prompts)
        meta={"temperature": layout.temperature, "prompts": len(group_sizes)},
        response_masks=masks if any(mask is not None for mask in masks) else None,
    )
    return batch, None


def reward_summary(scored: Batch) -> Batch:
    """What of a reward role's output the controller needs: each row's sequence score (the sum of its token-level
    scores: dynamic sampling's filter, ReMax's baseline), and the per-sample fields (score, acc, failures)."""
    return Batch({"sequence_score": scored["token_level_scores"].sum(-1)}, scored.non_tensors, scored.meta)


@dataclass(frozen=True)
class UpdateSettings:
    """The algorithm's settings that turn the roles' outputs into what the updates train on."""

    adv_estimator: str
    use_kl_in_reward: bool
    kl_penalty: str
    kl_coef: float  # the KL controller's value this step
    gamma: float
    lam: float
    norm_adv_by_std: bool
    recompute_old_logprobs: bool
    rollout_correction: Mapping[str, Any]  # rollout_correction's keyword settings (RolloutCorrectionConfig)
    policy_version: int  # the trainer's weight version before this update: a sample's staleness is this - its own
    max_response_length: int
    max_prompt_length: int


def prepare_update(batch: Batch, settings: UpdateSettings) -> tuple[Batch, dict[str, float]]:
    """From the merged step batch (generations, rewards, reference/old log-probs, values) to the fields the updates
    add: old_logprobs (the rollout's, unless recomputed), token_level_rewards (KL-penalised with use_kl_in_reward),
    advantages and returns. The metrics are the step's batch metrics under verl's names, among them
    actor/reward_kl_penalty (the KL the controller's KL controller takes) and perf/total_num_tokens.

    The rollout correction: with recomputed old log-probs (decoupled mode) it runs here on pi_old / pi_rollout, adds
    rollout_is_weights and, when it rejects, a response_mask without the rejected tokens (for the updates only: the
    batch metrics count every generated token), and its rollout_corr/ metrics. In bypass mode the old policy is the
    rollout's, so meta["rollout_correction"] asks the policy trainer to apply it against its current policy."""
    metrics: dict[str, float] = {}
    added: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    response_mask = batch["response_mask"]
    kept: torch.Tensor | None = None
    if settings.recompute_old_logprobs:  # how well the engine agrees with the trainer on the same weights
        old_logprobs = batch["old_logprobs"]
        metrics |= rollout_probs_diff_metrics(old_logprobs, batch["rollout_logprobs"], response_mask)
        corrected = rollout_correction(
            old_logprobs, batch["rollout_logprobs"], response_mask, **settings.rollout_correction
        )
        metrics |= corrected.metrics
        if corrected.weights is not None:
            added["rollout_is_weights"] = corrected.weights
        if settings.rollout_correction.get("rollout_rs") is not None:
            kept = corrected.keep.to(response_mask.dtype)
    else:
        old_logprobs = added["old_logprobs"] = batch["rollout_logprobs"]
        meta["rollout_correction"] = dict(settings.rollout_correction)
    rewards = batch["token_level_scores"]
    if settings.use_kl_in_reward:
        rewards, mean_kl = apply_kl_penalty(
            rewards,
            old_logprobs,
            batch["ref_logprobs"],
            batch["response_mask"],
            settings.kl_coef,
            settings.kl_penalty,
        )
        metrics |= {
            "actor/reward_kl_penalty": float(mean_kl),
            "actor/reward_kl_penalty_coeff": settings.kl_coef,
        }
    advantages, returns = get_advantage_estimator(settings.adv_estimator)(
        rewards,
        batch["response_mask"],
        group_ids=batch["uid"],
        values=batch.get("values"),
        baseline_rewards=batch.get("baseline_rewards"),
        gamma=settings.gamma,
        lam=settings.lam,
        norm_adv_by_std=settings.norm_adv_by_std,
    )
    added |= {"token_level_rewards": rewards, "advantages": advantages, "returns": returns}
    update = Batch(added, meta=meta)
    merged = Batch.merge([batch, update])
    metrics |= reward_metrics(merged)
    metrics |= data_metrics(
        merged, max_response_length=settings.max_response_length, max_prompt_length=settings.max_prompt_length
    )
    metrics["perf/total_num_tokens"] = float(merged["attention_mask"].sum().item())
    metrics |= staleness_metrics(batch["weight_version"], batch.get("last_weight_version"), settings.policy_version)
    if "episode" in batch:  # num_turns, tool_calls, how episodes ended (one stats record per episode)
        metrics |= episode_metrics([stats for stats in batch["episode"] if stats is not None])
    if kept is not None:
        update["response_mask"] = kept
    return update, metrics
