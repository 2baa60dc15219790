"""Rollout correction: importance weights, rejection and mismatch metrics between the sampling engine and trainer."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlmesh.algo.masked import masked_mean

__all__ = ["IS_LEVELS", "RS_LEVELS", "RolloutCorrection", "rollout_correction", "rs_bounds"]

IS_LEVELS = ("token", "sequence")
RS_LEVELS = ("token", "sequence", "geometric")
# exp(±20) bounds every ratio before it is exponentiated, so that one wild token cannot overflow a product.
SAFETY_LOG_BOUND = 20.0


class RolloutCorrection(NamedTuple):
    weights: Tensor | None  # [B, T] importance weights, 0 on padding; None when rollout_is is None
    keep: Tensor  # [B, T] bool: response tokens that stay in the loss (all of them when rollout_rs is None)
    metrics: dict[str, float]  # rollout_corr/... (see rollout_correction)


def rs_bounds(threshold: float | None, lower: float | None, is_threshold: float) -> tuple[float, float]:
    """(lower, upper) of the rejection interval: upper defaults to the IS threshold, lower to 1 / upper."""
    upper = threshold if threshold is not None else is_threshold
    return (lower if lower is not None else 1.0 / upper), upper


def rollout_correction(
    train_log_prob: Tensor,
    rollout_log_prob: Tensor,
    response_mask: Tensor,
    *,
    rollout_is: str | None = None,
    rollout_is_threshold: float = 2.0,
    rollout_rs: str | None = None,
    rollout_rs_threshold: float | None = None,
    rollout_rs_threshold_lower: float | None = None,
) -> RolloutCorrection:
    """Weights and a rejection mask that correct for sampling from π_rollout (the engine) while training π_train
    (the trainer's log-probs of the same tokens: the recomputed old policy, or the current one in bypass mode).

    With m_it the response mask of token t in sample i, L_i = sum_t m_it and

        d_it = log π_train(y_it) - log π_rollout(y_it)       clamped to ±20 before exp,

    importance weights (rollout_is), truncated at C = rollout_is_threshold (TIS):

        token      w_it = min(exp(d_it), C)
        sequence   w_it = min(exp(sum_t m_it d_it), C)          one weight for every token of sample i

    rejection (rollout_rs): keep what lies in [lo, hi], hi = rollout_rs_threshold (default C), lo =
    rollout_rs_threshold_lower (default 1 / hi):

        token      keep_it = lo <= exp(d_it) <= hi                         two-sided token masking (IcePop)
        sequence   keep_it = lo <= exp(sum_t m_it d_it) <= hi              the whole sample goes (masked IS, MIS)
        geometric  keep_it = lo <= exp((1 / L_i) sum_t m_it d_it) <= hi    the per-token geometric mean: no length bias

    Metrics, under verl's rollout_corr/ names, are computed whatever is turned on. Token means run over every
    response token, sample means over samples with L_i > 0:

        kl                   mean_it(-d_it)                           k1 estimate of KL(π_rollout || π_train)
        k3_kl                mean_it(exp(d_it) - 1 - d_it)            k3 estimate, >= 0
        chi2_token           mean_it(exp(2 d_it)) - 1
        training_log_ppl     mean_i(-(1 / L_i) sum_t m_it log π_train)     rollout_log_ppl likewise with π_rollout
        training_ppl         mean_i(exp(-(1 / L_i) sum_t m_it log π_train)) rollout_ppl likewise
        log_ppl_diff         mean_i(rollout_log_ppl_i - training_log_ppl_i), with _max and _min; log_ppl_abs_diff
                             the mean of its absolute value
        rollout_is_mean, _std, _min, _max    of w over tokens (token level) or samples (sequence level), after
                             truncation; rollout_is_eff_sample_size = mean(w)^2 / mean(w^2), the fraction of the
                             batch the weighted sample is worth
        rollout_is_ratio_fraction_high / _low    fraction whose untruncated ratio is above C / below 1 / C: high is
                             the fraction truncated
        rollout_rs_masked_fraction       response tokens rejected
        rollout_rs_seq_masked_fraction   samples with at least one rejected token
    """
    if rollout_is is not None and rollout_is not in IS_LEVELS:
        raise ValueError(f"rollout_is must be one of {IS_LEVELS} or None, got {rollout_is!r}")
    if rollout_rs is not None and rollout_rs not in RS_LEVELS:
        raise ValueError(f"rollout_rs must be one of {RS_LEVELS} or None, got {rollout_rs!r}")
    valid = response_mask != 0
    train, rollout = train_log_prob.detach().float(), rollout_log_prob.detach().float()
    log_ratio = torch.where(valid, train - rollout, 0.0)
    lengths = valid.sum(-1)
    has_tokens = lengths > 0
    sequence_log_ratio = log_ratio.sum(-1)  # [B]
    bounded = log_ratio.clamp(-SAFETY_LOG_BOUND, SAFETY_LOG_BOUND)
    token_ratio = bounded.exp()
    metrics = _mismatch_metrics(train, rollout, log_ratio, token_ratio, valid, lengths, has_tokens)

    weights = None
    if rollout_is is not None:
        cap = rollout_is_threshold
        if rollout_is == "token":
            weights = torch.where(valid, token_ratio.clamp(max=cap), 0.0)
            raw_logs, truncated = log_ratio[valid], weights[valid]
        else:
            per_sample = sequence_log_ratio.clamp(-SAFETY_LOG_BOUND, SAFETY_LOG_BOUND).exp()
            weights = torch.where(valid, per_sample.clamp(max=cap)[:, None].expand_as(log_ratio), 0.0)
            raw_logs, truncated = sequence_log_ratio[has_tokens], per_sample.clamp(max=cap)[has_tokens]
        metrics |= _weight_metrics(truncated, raw_logs, cap)

    keep = valid.clone()
    if rollout_rs is not None:
        lower, upper = rs_bounds(rollout_rs_threshold, rollout_rs_threshold_lower, rollout_is_threshold)
        if rollout_rs == "token":
            log_tested = log_ratio
        elif rollout_rs == "sequence":
            log_tested = sequence_log_ratio[:, None].expand_as(log_ratio)
        else:
            geometric = sequence_log_ratio / lengths.clamp_min(1)
            log_tested = geometric[:, None].expand_as(log_ratio)
        # Compared in log space: exact at the bounds, and no overflow for long sequences.
        keep = valid & (log_tested >= math.log(lower)) & (log_tested <= math.log(upper))
    rejected = valid & ~keep
    tokens = max(int(valid.sum()), 1)
    samples = max(int(has_tokens.sum()), 1)
    metrics["rollout_corr/rollout_rs_masked_fraction"] = float(rejected.sum()) / tokens
    metrics["rollout_corr/rollout_rs_seq_masked_fraction"] = float(rejected.any(-1).sum()) / samples
    return RolloutCorrection(weights, keep, metrics)


def _mismatch_metrics(
    train: Tensor,
    rollout: Tensor,
    log_ratio: Tensor,
    token_ratio: Tensor,
    valid: Tensor,
    lengths: Tensor,
    has_tokens: Tensor,
) -> dict[str, float]:
    if not bool(has_tokens.any()):
        return {}
    per_length = lengths.clamp_min(1).float()
    training_log_ppl = (-torch.where(valid, train, 0.0).sum(-1) / per_length)[has_tokens]
    rollout_log_ppl = (-torch.where(valid, rollout, 0.0).sum(-1) / per_length)[has_tokens]
    gap = rollout_log_ppl - training_log_ppl
    prefix = "rollout_corr/"
    return {
        prefix + "kl": float(masked_mean(-log_ratio, valid)),
        prefix + "k3_kl": float(masked_mean(token_ratio - 1 - log_ratio, valid)),
        prefix + "chi2_token": float(masked_mean(token_ratio.square(), valid)) - 1.0,
        prefix + "training_log_ppl": float(training_log_ppl.mean()),
        prefix + "rollout_log_ppl": float(rollout_log_ppl.mean()),
        prefix + "training_ppl": float(training_log_ppl.exp().mean()),
        prefix + "rollout_ppl": float(rollout_log_ppl.exp().mean()),
        prefix + "log_ppl_diff": float(gap.mean()),
        prefix + "log_ppl_abs_diff": float(gap.abs().mean()),
        prefix + "log_ppl_diff_max": float(gap.max()),
        prefix + "log_ppl_diff_min": float(gap.min()),
    }


def _weight_metrics(weights: Tensor, raw_log_ratios: Tensor, cap: float) -> dict[str, float]:
    """Statistics of the truncated weights, and how often the untruncated ratio left [1 / cap, cap]."""
    if weights.numel() == 0:
        return {}
    prefix = "rollout_corr/rollout_is_"
    second_moment = float(weights.square().mean())
    return {
        prefix + "mean": float(weights.mean()),
        prefix + "std": float(weights.std(unbiased=False)),
        prefix + "min": float(weights.min()),
        prefix + "max": float(weights.max()),
        prefix + "eff_sample_size": float(weights.mean()) ** 2 / second_moment if second_moment > 0 else 0.0,
        prefix + "ratio_fraction_high": float((raw_log_ratios > math.log(cap)).float().mean()),
        prefix + "ratio_fraction_low": float((raw_log_ratios < -math.log(cap)).float().mean()),
    }
