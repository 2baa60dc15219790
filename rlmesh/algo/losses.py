"""Policy losses (PPO clip with dual clip, GSPO) and their registry, loss aggregation, and the clipped value loss.

Policy losses share one signature so the trainer calls whichever the config names (actor.policy_loss):

    loss, metrics = get_policy_loss(name)(
        old_log_prob, log_prob, advantages, response_mask,
        loss_agg_mode=..., clip_ratio=..., clip_ratio_low=..., clip_ratio_high=..., clip_ratio_c=...,
    )

All per-token inputs are [B, T]. Masked positions never reach the loss, its gradient or a metric, whatever they
hold (NaN included). Metrics are detached 0-dim tensors named as in verl without the "actor/" prefix, so the
trainer can reduce them across micro-batches before one device-to-host copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from rlmesh.algo.masked import masked_mean, masked_sum

__all__ = [
    "GSPO_LOG_RATIO_MAX",
    "LOG_RATIO_CLAMP",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "PolicyLoss",
    "agg_loss",
    "compute_policy_loss_gspo",
    "compute_policy_loss_vanilla",
    "explained_variance",
    "get_policy_loss",
    "register_policy_loss",
    "value_loss",
]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# The bound on a token's log-ratio before exp(), as verl's PPO loss. exp(20) ~ 4.9e8 is finite in float32 and
# bfloat16 (max ~3.4e38) but not in float16 (max 65504): what keeps the ratio finite is that it is computed in
# float32, from the float32 log-probs response_logprobs returns (logits are promoted to at least float32), and the
# trainer refuses float16 compute. A log-ratio that large means the sample is hopelessly off-policy anyway.
LOG_RATIO_CLAMP = 20.0
# GSPO's sequence ratio is bounded tighter above, as verl's: with a negative advantage the loss is -A_i s_i itself,
# up to |A_i| exp(20) ~ 4.9e8 |A_i| under the PPO bound, and one such sequence would swamp a batch's loss.
GSPO_LOG_RATIO_MAX = 10.0


# ------------------------------------------------------------------------------------------------ aggregation


def agg_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    norm_constant: float | None = None,
    *,
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar; l_it is the loss, m_it the mask, L_i = sum_t m_it.

        token-mean               sum_it m_it l_it / sum_it m_it                    every token weighs the same
        seq-mean-token-sum       (1 / S) sum_i sum_t m_it l_it                     S = #rows with L_i > 0
        seq-mean-token-mean      (1 / S) sum_i (sum_t m_it l_it) / L_i             every sequence weighs the same
        seq-mean-token-sum-norm  (1 / S) sum_i sum_t m_it l_it / norm_constant     Dr.GRPO: a constant, e.g. the
                                                                                   max response length, not L_i

    So seq-mean-token-sum-norm is seq-mean-token-sum / norm_constant, and token-mean equals seq-mean-token-mean
    when every row has the same L_i. Rows with L_i = 0 are left out of S. seq-mean-token-sum-norm needs a
    norm_constant here, with no default. The policy trainer passes loss_norm_constant, else the padded response
    width T (policy_objective), and the critic T; T follows each batch's longest response unless the batch is padded
    to a fixed width, so Dr.GRPO's fixed constant needs loss_norm_constant (recipes/drgrpo.yaml: max_tokens).
    verl's agg_loss computes the same: the sequence sums over the sequence count, divided by its
    loss_scale_factor, which also defaults to T.

    `denominator`, when given, replaces sum_it m_it (token-mean) or S (seq modes). With gradient accumulation or
    data parallelism pass the count over the whole mini-batch on every rank, so that the micro-batch losses sum to
    the mini-batch loss instead of a mean of means.
    """
    if mode == "token-mean":
        count = masked_sum(torch.ones_like(loss_mat), mask) if denominator is None else denominator
        return masked_sum(loss_mat, mask) / _at_least_tiny(count, loss_mat)

    lengths = masked_sum(torch.ones_like(loss_mat), mask, dim=-1)
    sequence_sums = masked_sum(loss_mat, mask, dim=-1)
    if mode == "seq-mean-token-sum":
        per_sequence = sequence_sums
    elif mode == "seq-mean-token-mean":
        per_sequence = sequence_sums / lengths.clamp_min(torch.finfo(loss_mat.dtype).tiny)
    elif mode == "seq-mean-token-sum-norm":
        if norm_constant is None or norm_constant <= 0:
            raise ValueError(
                f"loss_agg_mode 'seq-mean-token-sum-norm' needs a positive norm_constant, got {norm_constant}; "
                "pass the max response length (Dr.GRPO) from the config"
            )
        per_sequence = sequence_sums / norm_constant
    else:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; known: {list(LOSS_AGG_MODES)}")
    non_empty = lengths > 0
    n_sequences = non_empty.sum() if denominator is None else denominator
    return masked_sum(per_sequence, non_empty) / _at_least_tiny(n_sequences, loss_mat)


def _at_least_tiny(count: float | Tensor, like: Tensor) -> Tensor:
    # An empty batch gives 0 / tiny = 0 rather than NaN; the numerator is exactly 0 then.
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp_min(torch.finfo(like.dtype).tiny)


# ------------------------------------------------------------------------------------------ policy loss registry


class PolicyLoss(Protocol):
    """The one signature every registered policy loss has; see the module docstring."""

    def __call__(
        self,
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        *,
        loss_agg_mode: str | None = None,
        clip_ratio: float = 0.2,
        clip_ratio_low: float | None = None,
        clip_ratio_high: float | None = None,
        clip_ratio_c: float | None = 3.0,
        norm_constant: float | None = None,
        denominator: float | Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator that adds a policy loss to POLICY_LOSSES under `name` (config: actor.policy_loss)."""

    def decorator(loss_fn: PolicyLoss) -> PolicyLoss:
        existing = POLICY_LOSSES.get(name)
        if existing is not None and existing is not loss_fn:
            raise ValueError(f"policy loss {name!r} is already registered as {existing!r}; pick another name")
        POLICY_LOSSES[name] = loss_fn
        return loss_fn

    return decorator


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered under `name`; a ValueError listing the known names otherwise."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown policy loss {name!r}; known: {sorted(POLICY_LOSSES)}. "
            "Register your own with @rlmesh.algo.register_policy_loss(name)."
        ) from None


def _clip_bounds(clip_ratio: float, clip_ratio_low: float | None, clip_ratio_high: float | None) -> tuple[float, float]:
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    if low < 0 or high < 0 or low >= 1:
        raise ValueError(
            f"clip ratios must satisfy 0 <= clip_ratio_low < 1 and clip_ratio_high >= 0, got low={low}, high={high}"
        )
    return 1.0 - low, 1.0 + high


def _masked_inputs(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(log_ratio, advantages), both 0 at masked positions so that padding cannot reach a value or a gradient."""
    valid = mask != 0
    log_ratio = torch.where(valid, log_prob - old_log_prob.detach(), 0.0)
    return log_ratio, torch.where(valid, advantages.detach(), 0.0)


# --------------------------------------------------------------------------------------------- policy losses


@register_policy_loss("vanilla")
@register_policy_loss("ppo")
def compute_policy_loss_vanilla(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    loss_agg_mode: str | None = None,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float | None = 3.0,
    norm_constant: float | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017) with clip-higher (DAPO) and dual clip (Ye et al. 2020).

        r_t   = exp(clamp(log_prob_t - old_log_prob_t, -20, 20))
        l_t   = max(-A_t r_t, -A_t clip(r_t, 1 - clip_ratio_low, 1 + clip_ratio_high))
        l_t   = min(l_t, -A_t clip_ratio_c)                      only where A_t < 0 (dual clip; None disables it)
        loss  = agg_loss(l, mask, loss_agg_mode)                 loss_agg_mode defaults to token-mean

    clip_ratio_low/high default to clip_ratio. Dual clip bounds the loss of a negative-advantage token whose ratio
    has grown past clip_ratio_c (> 1), where plain PPO would grow without limit. Where a clip is active the
    gradient is 0.

    Metrics: pg_clipfrac (fraction of valid tokens where the 1 +/- clip bound is active), pg_clipfrac_lower
    (fraction where the dual clip is active) and ppo_kl (mean of old_log_prob - log_prob, a k1 estimate of
    KL(old || new)).
    """
    lower, upper = _clip_bounds(clip_ratio, clip_ratio_low, clip_ratio_high)
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip PPO), got {clip_ratio_c}; or None to disable it")
    log_ratio, advantages = _masked_inputs(old_log_prob, log_prob, advantages, response_mask)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(lower, upper)
    losses = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped

    if clip_ratio_c is None:
        dual_clip_active = torch.zeros_like(clip_active)
    else:
        dual_bound = -advantages * clip_ratio_c
        dual_clip_active = (advantages < 0) & (losses > dual_bound)
        losses = torch.where(dual_clip_active, dual_bound, losses)

    loss = agg_loss(losses, response_mask, loss_agg_mode or "token-mean", norm_constant, denominator=denominator)
    metrics = {
        "pg_clipfrac": masked_mean(clip_active.to(loss.dtype), response_mask).detach(),
        "pg_clipfrac_lower": masked_mean(dual_clip_active.to(loss.dtype), response_mask).detach(),
        "ppo_kl": masked_mean(-log_ratio, response_mask).detach(),
    }
    return loss, metrics


@register_policy_loss("gspo")
def compute_policy_loss_gspo(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    loss_agg_mode: str | None = None,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float | None = 3.0,
    norm_constant: float | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025, arXiv:2507.18071): clip one importance ratio per sequence, not per token.

        s_i    = exp((1 / L_i) sum_t m_it (log_prob_it - old_log_prob_it))     geometric mean of the token ratios
        s_it   = sg[s_i] * pi_it / sg[pi_it]                                   value s_i, gradient through token t
        l_it   = max(-A_it s_it, -A_it clip(s_it, 1 - clip_ratio_low, 1 + clip_ratio_high))
        loss   = agg_loss(l, mask, loss_agg_mode)                              defaults to seq-mean-token-mean

    With seq-mean-token-mean and sequence-level advantages this is the paper's GSPO objective and gradient,
    -(1/S) sum_i A_i s_i (1/L_i) sum_t grad log pi_it; with token-level advantages it is GSPO-token. The paper
    clips tightly (clip_ratio_low 3e-4, clip_ratio_high 4e-4), since s_i is a per-token geometric mean. The
    log-ratio is clamped to [-20, 10], at 10 above as verl (GSPO_LOG_RATIO_MAX): with A_i < 0 the loss of a sequence
    is -A_i s_i, at most |A_i| exp(10) ~ 2.2e4 |A_i|, and its gradient is 0 beyond the bound. GSPO has no dual
    clip: clip_ratio_c is not used and pg_clipfrac_lower is 0.
    """
    lower, upper = _clip_bounds(clip_ratio, clip_ratio_low, clip_ratio_high)
    log_ratio, advantages = _masked_inputs(old_log_prob, log_prob, advantages, response_mask)
    sequence_log_ratio = masked_mean(log_ratio, response_mask, dim=-1, keepdim=True)
    # log_prob - sg[log_prob] is 0 in value and carries d log_prob in the gradient: the stop-gradient trick.
    token_log_ratio = torch.where(response_mask != 0, log_prob - log_prob.detach(), 0.0) + sequence_log_ratio.detach()
    ratio = torch.exp(token_log_ratio.clamp(-LOG_RATIO_CLAMP, GSPO_LOG_RATIO_MAX))

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(lower, upper)
    losses = torch.maximum(unclipped, clipped)

    mode = loss_agg_mode or "seq-mean-token-mean"
    loss = agg_loss(losses, response_mask, mode, norm_constant, denominator=denominator)
    metrics = {
        "pg_clipfrac": masked_mean((clipped > unclipped).to(loss.dtype), response_mask).detach(),
        "pg_clipfrac_lower": torch.zeros((), dtype=loss.dtype, device=loss.device),
        "ppo_kl": masked_mean(-log_ratio, response_mask).detach(),
    }
    return loss, metrics


# ------------------------------------------------------------------------------------------------ value loss


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
    agg_mode: str = "token-mean",
    norm_constant: float | None = None,
    *,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss for the critic (PPO as in verl and OpenAI baselines).

        V_clip = old_V + clamp(V - old_V, -cliprange_value, cliprange_value)
        l_t    = max((V_t - R_t)^2, (V_clip_t - R_t)^2)
        loss   = 0.5 * agg_loss(l, mask, agg_mode)

    Metric vf_clipfrac: the fraction of valid tokens where the clipped term is the larger (its gradient is 0 there).
    """
    valid = mask != 0
    values = torch.where(valid, values, 0.0)
    old_values = torch.where(valid, old_values.detach(), 0.0)
    returns = torch.where(valid, returns.detach(), 0.0)
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * agg_loss(
        torch.maximum(unclipped_loss, clipped_loss), mask, agg_mode, norm_constant, denominator=denominator
    )
    return loss, {"vf_clipfrac": masked_mean((clipped_loss > unclipped_loss).to(loss.dtype), mask).detach()}


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over valid tokens (population variances): 1 is perfect, 0 is no better than a constant.

    NaN when the returns have no variance, where the ratio is undefined (as in Stable-Baselines3).
    """
    returns_var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    residual_var = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return torch.where(returns_var > 0, 1 - residual_var / returns_var, torch.nan)
