"""Rollout correction: importance weights, rejection and mismatch metrics between the sampling engine and trainer."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlmesh.algo.masked import masked_mean, masked_var

__all__ = ["IS_LEVELS", "RS_LEVELS", "RolloutCorrection", "rollout_correction", "rs_bounds"]

IS_LEVELS = ("token", "sequence")
RS_LEVELS = ("token", "sequence", "geometric")
# exp(±20) bounds every ratio before it is exponentiated, so that one wild token cannot overflow a product.
SAFETY_LOG_BOUND = 20.0


class RolloutCorrection(NamedTuple):
    weights: Tensor | None  # [B, T] importance weights, 0 on padding; None when rollout_is is None
    keep: Tensor  # [B, T] bool: response tokens that stay in the loss (all of them when rollout_rs is None)
    # rollout_corr/... (see rollout_correction) as 0-d tensors on the inputs' device: reading them is left to the
    # caller, so that a training step pays one device-to-host copy for all of them (`metrics`), or none.
    metric_tensors: dict[str, Tensor]
    tokens: Tensor  # 0-d: the response tokens counted

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics as floats, read in one copy; none when there was no response token."""
        values = torch.stack([self.tokens.double(), *(t.double() for t in self.metric_tensors.values())]).tolist()
        return dict(zip(self.metric_tensors, values[1:], strict=True)) if values[0] > 0 else {}


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
            metrics |= _weight_metrics(weights, log_ratio, valid, cap)
        else:
            per_sample = sequence_log_ratio.clamp(-SAFETY_LOG_BOUND, SAFETY_LOG_BOUND).exp().clamp(max=cap)
            weights = torch.where(valid, per_sample[:, None].expand_as(log_ratio), 0.0)
            metrics |= _weight_metrics(per_sample, sequence_log_ratio, has_tokens, cap)

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
    tokens = valid.sum()
    metrics["rollout_corr/rollout_rs_masked_fraction"] = rejected.sum() / tokens.clamp_min(1)
    metrics["rollout_corr/rollout_rs_seq_masked_fraction"] = rejected.any(-1).sum() / has_tokens.sum().clamp_min(1)
    return RolloutCorrection(weights, keep, metrics, tokens)


def _masked_max(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, -math.inf).max()


def _masked_min(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, math.inf).min()


def _mismatch_metrics(
    train: Tensor,
    rollout: Tensor,
    log_ratio: Tensor,
    token_ratio: Tensor,
    valid: Tensor,
    lengths: Tensor,
    has_tokens: Tensor,
) -> dict[str, Tensor]:
    # Masks rather than boolean indexing throughout: indexing by a mask reads it on the host, a sync per metric.
    per_length = lengths.clamp_min(1).float()
    training_log_ppl = -torch.where(valid, train, 0.0).sum(-1) / per_length
    rollout_log_ppl = -torch.where(valid, rollout, 0.0).sum(-1) / per_length
    gap = rollout_log_ppl - training_log_ppl
    prefix = "rollout_corr/"
    return {
        prefix + "kl": masked_mean(-log_ratio, valid),
        prefix + "k3_kl": masked_mean(token_ratio - 1 - log_ratio, valid),
        prefix + "chi2_token": masked_mean(token_ratio.square(), valid) - 1.0,
        prefix + "training_log_ppl": masked_mean(training_log_ppl, has_tokens),
        prefix + "rollout_log_ppl": masked_mean(rollout_log_ppl, has_tokens),
        prefix + "training_ppl": masked_mean(training_log_ppl.exp(), has_tokens),
        prefix + "rollout_ppl": masked_mean(rollout_log_ppl.exp(), has_tokens),
        prefix + "log_ppl_diff": masked_mean(gap, has_tokens),
        prefix + "log_ppl_abs_diff": masked_mean(gap.abs(), has_tokens),
        prefix + "log_ppl_diff_max": _masked_max(gap, has_tokens),
        prefix + "log_ppl_diff_min": _masked_min(gap, has_tokens),
    }


def _weight_metrics(weights: Tensor, raw_log_ratios: Tensor, counted: Tensor, cap: float) -> dict[str, Tensor]:
    """Statistics of the truncated weights where `counted`, and how often the untruncated ratio left
    [1 / cap, cap]."""
    prefix = "rollout_corr/rollout_is_"
    mean = masked_mean(weights, counted)
    second_moment = masked_mean(weights.square(), counted)
    return {
        prefix + "mean": mean,
        prefix + "std": masked_var(weights, counted, unbiased=False).sqrt(),
        prefix + "min": _masked_min(weights, counted),
        prefix + "max": _masked_max(weights, counted),
        prefix + "eff_sample_size": torch.where(second_moment > 0, mean.square() / second_moment.clamp_min(1e-30), 0.0),
        prefix + "ratio_fraction_high": masked_mean((raw_log_ratios > math.log(cap)).float(), counted),
        prefix + "ratio_fraction_low": masked_mean((raw_log_ratios < -math.log(cap)).float(), counted),
    }
