"""KL estimators between policy and reference, as a loss term or a reward penalty, and the KL coefficient controllers.

Each estimator is per token, from the sampled token's log-probabilities under the policy (log p) and the reference
(log q); samples come from the policy, and d = log p - log q (Schulman 2020, "Approximating KL Divergence"):

    k1  (kl)               d                                   unbiased for KL(p || q), high variance, can be < 0
    k2  (mse)              d^2 / 2                             biased, low variance, >= 0
    k3  (low_var_kl)       exp(-d) - (-d) - 1, clamped         unbiased for KL(p || q), low variance, >= 0
    abs                    |d|

As a loss term (use_kl_loss, kl_loss_coef) use kl_loss, as policy_objective does; as a reward penalty use
apply_kl_penalty with the value of a FixedKLController or an AdaptiveKLController.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rlmesh.algo.losses import agg_loss
from rlmesh.algo.masked import masked_mean

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "apply_kl_penalty",
    "get_kl_estimator",
    "kl_loss",
    "kl_penalty",
    "make_kl_controller",
]

KLEstimator = Callable[[Tensor, Tensor], Tensor]

# Bounds as in verl's low_var_kl: the log-ratio before exp() so it cannot overflow, the estimate after, because a
# handful of tokens with a k3 of 10^3 would otherwise dominate a whole batch's loss.
_K3_LOG_RATIO_CLAMP = 20.0
_K3_VALUE_CLAMP = 10.0


def _k1(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    return log_prob - ref_log_prob


def _k2(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    return 0.5 * (log_prob - ref_log_prob) ** 2


def _k3(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    log_ratio = (ref_log_prob - log_prob).clamp(-_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-_K3_VALUE_CLAMP, _K3_VALUE_CLAMP)


def _abs(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    return (log_prob - ref_log_prob).abs()


KL_ESTIMATORS: dict[str, KLEstimator] = {
    "k1": _k1,
    "kl": _k1,
    "k2": _k2,
    "mse": _k2,
    "k3": _k3,
    "low_var_kl": _k3,
    "abs": _abs,
}


def get_kl_estimator(kind: str) -> KLEstimator:
    """The per-token estimator named `kind` (see the module docstring); a ValueError listing the known names."""
    try:
        return KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown KL estimator {kind!r}; known: {sorted(KL_ESTIMATORS)}") from None


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL estimate of `kind` (k1/kl, k2/mse, k3/low_var_kl, abs), elementwise, same shape as the inputs.

    Unmasked: callers mask, as apply_kl_penalty and kl_loss do.
    """
    return get_kl_estimator(kind)(log_prob, ref_log_prob)


def kl_loss(
    log_prob: Tensor,
    ref_log_prob: Tensor,
    mask: Tensor,
    kind: str = "low_var_kl",
    loss_agg_mode: str = "token-mean",
    norm_constant: float | None = None,
    *,
    denominator: float | Tensor | None = None,
) -> Tensor:
    """KL to the reference as a loss term: agg_loss(kl_penalty(log_prob, ref_log_prob, kind), mask, loss_agg_mode,
    norm_constant, denominator=denominator).

    policy_objective adds kl_loss_coef times this to the policy loss (use_kl_loss). Gradient flows through
    log_prob only; the reference is a constant.
    """
    valid = mask != 0
    per_token = kl_penalty(torch.where(valid, log_prob, 0.0), torch.where(valid, ref_log_prob.detach(), 0.0), kind)
    return agg_loss(per_token, mask, loss_agg_mode, norm_constant, denominator=denominator)


@torch.no_grad()
def apply_kl_penalty(
    token_level_scores: Tensor,
    log_prob: Tensor,
    ref_log_prob: Tensor,
    mask: Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[Tensor, Tensor]:
    """KL as a reward penalty: r_t = score_t - kl_coef * kl_t on valid tokens, 0 elsewhere.

    Returns (token_level_rewards [B, T], mean_kl), where mean_kl is the per-sequence token mean of kl_t averaged
    over the sequences with at least one valid token, the value to feed AdaptiveKLController.update and to log as
    actor/reward_kl_penalty.
    """
    valid = mask != 0
    per_token = torch.where(valid, kl_penalty(log_prob, ref_log_prob, kind), 0.0)
    rewards = torch.where(valid, token_level_scores - kl_coef * per_token, 0.0)
    per_sequence = masked_mean(per_token, mask, dim=-1)
    mean_kl = masked_mean(per_sequence, valid.any(dim=-1))
    return rewards, mean_kl


class FixedKLController:
    """A constant KL coefficient: `.value` never changes."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing; here so both controllers can be driven the same way."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (arXiv:1909.08593), steering the observed KL to `target`.

        e      = clip(current_kl / target - 1, -0.2, 0.2)
        value <- value * (1 + e * n_steps / horizon)

    n_steps is the number of samples (or steps) the KL was measured over; horizon sets how fast value moves.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target=}, {horizon=}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(
    kind: str, kl_coef: float, target: float | None = None, horizon: float | None = None
) -> KLController:
    """The controller named by config (algorithm.kl_ctrl.type): 'fixed' or 'adaptive' (needs target and horizon)."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError(f"an adaptive KL controller needs target and horizon, got {target=}, {horizon=}")
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; known: ['adaptive', 'fixed']")
