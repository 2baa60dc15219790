"""Advantage estimators (GAE, GRPO, RLOO, REINFORCE++, ReMax, OPO) and the registry that selects one by name.

Every estimator has the same keyword signature, so the controller calls whichever one the config names with all
the inputs it has and each estimator takes what it needs:

    advantages, returns = get_advantage_estimator(name)(
        token_level_rewards, response_mask, group_ids=uids, values=values, baseline_rewards=greedy_scores,
        gamma=gamma, lam=lam, norm_adv_by_std=norm_adv_by_std, eps=eps,
    )

Shapes: token_level_rewards, response_mask, values, advantages and returns are [B, T]; baseline_rewards is [B];
group_ids holds one hashable id (the prompt's uid) per row. Both outputs are 0 wherever response_mask is 0, and
what a masked position holds in any input (even NaN) never reaches an output. Outputs carry no gradient.

Outcome estimators score a response by s_i = sum_t m_it r_it, the masked sum of its token rewards.

A group of one response has no peer to serve as its baseline. Every group-based estimator here takes the group
mean of a single score to be that score, so grpo, rloo and opo give such a response advantage 0, and
reinforce_plus_plus_baseline gives it a centred score of 0 before the batch whitening. verl instead uses a
baseline of 0 (and std 1) there, which hands that one response its raw reward, on a scale unlike every other
response in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import Tensor

from rlmesh.algo.masked import masked_sum, masked_whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageEstimator",
    "EstimatorNeeds",
    "compute_gae_advantage",
    "compute_grpo_advantage",
    "compute_opo_advantage",
    "compute_reinforce_plus_plus_advantage",
    "compute_reinforce_plus_plus_baseline_advantage",
    "compute_remax_advantage",
    "compute_rloo_advantage",
    "discounted_returns",
    "estimator_needs",
    "get_advantage_estimator",
    "register_advantage",
]


class AdvantageEstimator(Protocol):
    """The one signature every registered estimator has; see the module docstring."""

    def __call__(
        self,
        token_level_rewards: Tensor,
        response_mask: Tensor,
        *,
        group_ids: Sequence[Hashable] | Tensor | None = None,
        values: Tensor | None = None,
        baseline_rewards: Tensor | None = None,
        gamma: float = 1.0,
        lam: float = 1.0,
        norm_adv_by_std: bool = True,
        eps: float = 1e-6,
    ) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class EstimatorNeeds:
    """What an estimator needs beyond rewards and the response mask; the config check and the loop read it."""

    values: bool = False  # per-token values from a critic
    groups: bool = False  # n >= 2 samples per prompt, grouped by group_ids
    baseline: bool = False  # baseline_rewards: the reward of each prompt's greedy response (ReMax)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}
ESTIMATOR_NEEDS: dict[str, EstimatorNeeds] = {}


def register_advantage(
    name: str, *, needs_values: bool = False, needs_groups: bool = False, needs_baseline: bool = False
) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator that adds an estimator to ADVANTAGE_ESTIMATORS under `name` (config: algorithm.adv_estimator),
    with what it needs: a critic's values, groups of samples per prompt, or a greedy baseline."""

    def decorator(estimator: AdvantageEstimator) -> AdvantageEstimator:
        existing = ADVANTAGE_ESTIMATORS.get(name)
        if existing is not None and existing is not estimator:
            raise ValueError(f"advantage estimator {name!r} is already registered as {existing!r}; pick another name")
        ADVANTAGE_ESTIMATORS[name] = estimator
        ESTIMATOR_NEEDS[name] = EstimatorNeeds(values=needs_values, groups=needs_groups, baseline=needs_baseline)
        return estimator

    return decorator


def estimator_needs(name: str) -> EstimatorNeeds:
    """What the estimator registered under `name` needs (nothing extra for an unknown name)."""
    return ESTIMATOR_NEEDS.get(name, EstimatorNeeds())


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered under `name`; a ValueError listing the known names otherwise."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}. "
            "Register your own with @rlmesh.algo.register_advantage(name)."
        ) from None


# ---------------------------------------------------------------------------------------------------- helpers


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask != 0, x, 0.0)


def _broadcast_to_tokens(per_sequence: Tensor, mask: Tensor) -> Tensor:
    return _zero_padding(per_sequence.unsqueeze(-1).expand(mask.shape), mask)


def _sequence_scores(token_level_rewards: Tensor, response_mask: Tensor) -> Tensor:
    return masked_sum(token_level_rewards, response_mask, dim=-1)


_T = TypeVar("_T")


def _required(value: _T | None, what: str, estimator: str, hint: str) -> _T:
    if value is None:
        raise ValueError(f"advantage estimator {estimator!r} needs {what}; {hint}")
    return value


def _group_index(
    group_ids: Sequence[Hashable] | Tensor | None, estimator: str, batch_size: int, device: torch.device
) -> Tensor:
    """Dense group index in [0, n_groups) for each row, in order of first appearance."""
    if group_ids is None:
        raise ValueError(
            f"advantage estimator {estimator!r} needs group_ids: one uid per row, shared by the rows of a prompt"
        )
    if isinstance(group_ids, Tensor):
        # Iterating a tensor yields 0-dim tensors that hash by identity, so equal uids would never match.
        index = torch.unique(group_ids, return_inverse=True)[1].to(device=device, dtype=torch.long)
    else:
        first_seen: dict[Hashable, int] = {}
        index = torch.tensor(
            [first_seen.setdefault(g, len(first_seen)) for g in group_ids], dtype=torch.long, device=device
        )
    if index.numel() != batch_size:
        raise ValueError(f"group_ids has {index.numel()} entries but the batch has {batch_size} rows; give one per row")
    return index.reshape(batch_size)


def _group_sum(x: Tensor, group: Tensor) -> Tensor:
    """Per-row sum of x over the row's group: out_i = sum_{j in g(i)} x_j."""
    n_groups = int(group.max().item()) + 1 if group.numel() else 0
    return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, group, x)[group]


def discounted_returns(token_level_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = sum_{k >= t, m_k = 1} gamma^(n(t, k)) r_k, with n(t, k) the number of valid tokens in (t, k].

    Masked tokens are skipped: they add no reward and take no discount step, so a multi-turn response with
    observation tokens masked out in the middle keeps one return across them. For right-padded responses this is
    the usual reward-to-go. G_t = 0 at masked positions.
    """
    rewards = _zero_padding(token_level_rewards, response_mask)
    running = torch.zeros_like(rewards[:, 0])
    returns = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        valid = response_mask[:, t] != 0
        running = torch.where(valid, rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(valid, running, 0.0)
    return returns


# ------------------------------------------------------------------------------------------------- estimators


@register_advantage("gae", needs_values=True)
@torch.no_grad()
def compute_gae_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    *,
    group_ids: Sequence[Hashable] | Tensor | None = None,
    values: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015, arXiv:1506.02438), for PPO with a critic.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}          (A and V are 0 past the last valid token)
        returns = A + V                                    (the critic's regression target, before whitening)
        advantages = masked_whiten(A)                      (batch mean 0, unbiased std 1 over valid tokens)

    Masked tokens are skipped, so t + 1 means the next valid token. Needs `values` [B, T]; whitening needs at least
    2 valid tokens in the batch.
    """
    values = _required(values, "values [B, T] from the critic", "gae", "run the critic or pick an outcome estimator")
    rewards = _zero_padding(token_level_rewards, response_mask)
    values = _zero_padding(values.to(rewards.dtype), response_mask)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    raw_advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        valid = response_mask[:, t] != 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_value = torch.where(valid, values[:, t], next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
        raw_advantages[:, t] = torch.where(valid, advantage, 0.0)
    returns = _zero_padding(raw_advantages + values, response_mask)
    return masked_whiten(raw_advantages, response_mask), returns


@register_advantage("grpo", needs_groups=True)
@torch.no_grad()
def compute_grpo_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    *,
    group_ids: Sequence[Hashable] | Tensor | None = None,
    values: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GRPO (Shao et al. 2024, arXiv:2402.03300): each response against the other responses to its prompt.

        A_i = (s_i - mean_g) / (std_g + eps)      norm_adv_by_std=True
        A_i =  s_i - mean_g                       norm_adv_by_std=False: Dr.GRPO (Liu et al. 2025, arXiv:2503.20783)

    mean_g and std_g (unbiased, as torch.std) are over the scores of row i's group. A_i is the same for every
    valid token of row i; returns = advantages. A group of one gets A = 0 (its std is taken as 0, not NaN); a
    group whose scores are all equal gets A = 0 too.
    """
    scores = _sequence_scores(token_level_rewards, response_mask)
    group = _group_index(group_ids, "grpo", scores.shape[0], scores.device)
    count = _group_sum(torch.ones_like(scores), group)
    centred = scores - _group_sum(scores, group) / count
    if norm_adv_by_std:
        # clamp(count - 1, 1): a group of one has a centred score of exactly 0, so its std is 0 instead of 0/0.
        std = torch.sqrt(_group_sum(centred**2, group) / (count - 1).clamp_min(1))
        centred = centred / (std + eps)
    advantages = _broadcast_to_tokens(centred, response_mask)
    return advantages, advantages


@register_advantage("rloo", needs_groups=True)
@torch.no_grad()
def compute_rloo_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    *,
    group_ids: Sequence[Hashable] | Tensor | None = None,
    values: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv:2402.14740): the baseline is the mean of the others.

        A_i = s_i - (1 / (n_g - 1)) * sum_{j in g, j != i} s_j  =  n_g / (n_g - 1) * (s_i - mean_g)

    A group of one (n_g = 1) has no others and gets A = 0. returns = advantages.
    """
    scores = _sequence_scores(token_level_rewards, response_mask)
    group = _group_index(group_ids, "rloo", scores.shape[0], scores.device)
    count = _group_sum(torch.ones_like(scores), group)
    others_sum = _group_sum(scores, group) - scores
    leave_one_out = torch.where(count > 1, scores - others_sum / (count - 1).clamp_min(1), 0.0)
    advantages = _broadcast_to_tokens(leave_one_out, response_mask)
    return advantages, advantages


@register_advantage("reinforce_plus_plus")
@torch.no_grad()
def compute_reinforce_plus_plus_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    *,
    group_ids: Sequence[Hashable] | Tensor | None = None,
    values: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): discounted return, whitened over the whole batch.

        G_t = r_t + gamma * G_{t+1}                 (see discounted_returns; masked tokens skipped)
        advantages = masked_whiten(G)               (batch mean 0, unbiased std 1 over valid tokens)
        returns = G

    No group ids or critic are needed; whitening needs at least 2 valid tokens in the batch.
    """
    returns = discounted_returns(token_level_rewards, response_mask, gamma)
    return masked_whiten(returns, response_mask), returns


@register_advantage("reinforce_plus_plus_baseline", needs_groups=True)
@torch.no_grad()
def compute_reinforce_plus_plus_baseline_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    *,
    group_ids: Sequence[Hashable] | Tensor | None = None,
    values: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline (Hu 2025, arXiv:2501.03262): group-mean baseline, then whitening over the batch.

        A_it = s_i - mean_g                 (on every valid token of row i)
        advantages = masked_whiten(A)       (over all valid tokens of the batch, so longer rows weigh more)

    A group of one has s_i - mean_g = 0 before whitening. returns = advantages.
    """
    scores = _sequence_scores(token_level_rewards, response_mask)
    group = _group_index(group_ids, "reinforce_plus_plus_baseline", scores.shape[0], scores.device)
    centred = scores - _group_sum(scores, group) / _group_sum(torch.ones_like(scores), group)
    advantages = masked_whiten(_broadcast_to_tokens(centred, response_mask), response_mask)
    return advantages, advantages


@register_advantage("remax", needs_baseline=True)
@torch.no_grad()
def compute_remax_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    *,
    group_ids: Sequence[Hashable] | Tensor | None = None,
    values: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """ReMax (Li et al. 2023, arXiv:2310.10505): the reward of the greedy response to the same prompt is the baseline.

        G_t = r_t + gamma * G_{t+1}                 (see discounted_returns; gamma = 1 is the paper's reward-to-go)
        A_it = G_it - b_i                           b_i = baseline_rewards[i], the greedy response's score
        returns = G

    The loop supplies b: it generates one greedy response per prompt, scores it, and repeats the score per row.
    """
    baseline_rewards = _required(
        baseline_rewards,
        "baseline_rewards [B] (the greedy response's reward for each row)",
        "remax",
        "the loop must generate and score a greedy response per prompt",
    )
    returns = discounted_returns(token_level_rewards, response_mask, gamma)
    baseline = baseline_rewards.to(returns.dtype).reshape(-1, 1)
    return _zero_padding(returns - baseline, response_mask), returns


@register_advantage("opo", needs_groups=True)
@torch.no_grad()
def compute_opo_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    *,
    group_ids: Sequence[Hashable] | Tensor | None = None,
    values: Tensor | None = None,
    baseline_rewards: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """OPO (Hao et al. 2025, arXiv:2505.23585): the optimal baseline for a sequence-sum loss, length-weighted.

        b_g = sum_{j in g} L_j s_j / sum_{j in g} L_j       L_j = number of valid tokens of row j
        A_i = s_i - b_g(i)

    A group of one has b = s_i, so A = 0; a group whose rows are all empty gets A = 0 too. returns = advantages.
    """
    scores = _sequence_scores(token_level_rewards, response_mask)
    lengths = masked_sum(torch.ones_like(token_level_rewards), response_mask, dim=-1)
    group = _group_index(group_ids, "opo", scores.shape[0], scores.device)
    group_length = _group_sum(lengths, group)
    baseline = _group_sum(lengths * scores, group) / group_length.clamp_min(1)
    advantages = _broadcast_to_tokens(torch.where(group_length > 0, scores - baseline, 0.0), response_mask)
    return advantages, advantages
