"""Rollout correction against hand-computed weights, rejections and mismatch metrics on a two-sample batch."""

from __future__ import annotations

import math

import pytest
import torch

from rlmesh.algo.rollout_correction import rollout_correction

# Sample 0 has two response tokens (then padding), sample 1 three; RATIOS are pi_train / pi_rollout per token.
RATIOS = [[3.0, 0.8], [1.0, 1.5, 0.25]]
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ROLLOUT = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -1.5, -3.0]])  # padding holds garbage on purpose


def train_logprobs() -> torch.Tensor:
    train = ROLLOUT.clone()
    for i, ratios in enumerate(RATIOS):
        for t, ratio in enumerate(ratios):
            train[i, t] = ROLLOUT[i, t] + math.log(ratio)
    train[0, 2] = float("inf")
    return train


def correct(**settings):
    return rollout_correction(train_logprobs(), ROLLOUT, MASK, **settings)


def test_the_mismatch_metrics_are_computed_with_the_correction_off():
    result = correct()
    flat = [r for ratios in RATIOS for r in ratios]
    metrics = result.metrics
    assert result.weights is None and torch.equal(result.keep, MASK.bool())
    assert metrics["rollout_corr/kl"] == pytest.approx(-sum(math.log(r) for r in flat) / 5)
    assert metrics["rollout_corr/k3_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in flat) / 5)
    assert metrics["rollout_corr/chi2_token"] == pytest.approx(sum(r * r for r in flat) / 5 - 1)
    rollout_log_ppl = [(1.0 + 2.0) / 2, (0.5 + 1.5 + 3.0) / 3]
    training_log_ppl = [
        rollout_log_ppl[i] - sum(math.log(r) for r in ratios) / len(ratios) for i, ratios in enumerate(RATIOS)
    ]
    assert metrics["rollout_corr/rollout_log_ppl"] == pytest.approx(sum(rollout_log_ppl) / 2)
    assert metrics["rollout_corr/training_log_ppl"] == pytest.approx(sum(training_log_ppl) / 2)
    assert metrics["rollout_corr/training_ppl"] == pytest.approx(sum(math.exp(x) for x in training_log_ppl) / 2)
    gaps = [r - t for r, t in zip(rollout_log_ppl, training_log_ppl, strict=True)]
    assert metrics["rollout_corr/log_ppl_abs_diff"] == pytest.approx(sum(abs(g) for g in gaps) / 2)
    assert metrics["rollout_corr/log_ppl_diff_max"] == pytest.approx(max(gaps))
    assert metrics["rollout_corr/rollout_rs_masked_fraction"] == 0.0
    assert all(math.isfinite(v) for v in metrics.values())


def test_token_weights_are_truncated_at_the_threshold():
    result = correct(rollout_is="token", rollout_is_threshold=2.0)
    assert result.weights is not None
    expected = torch.tensor([[2.0, 0.8, 0.0], [1.0, 1.5, 0.25]])
    torch.testing.assert_close(result.weights, expected)
    metrics = result.metrics
    assert metrics["rollout_corr/rollout_is_max"] == pytest.approx(2.0)  # 3.0 was clamped
    assert metrics["rollout_corr/rollout_is_min"] == pytest.approx(0.25)
    assert metrics["rollout_corr/rollout_is_ratio_fraction_high"] == pytest.approx(1 / 5)
    assert metrics["rollout_corr/rollout_is_ratio_fraction_low"] == pytest.approx(1 / 5)  # 0.25 < 1 / 2
    kept = [2.0, 0.8, 1.0, 1.5, 0.25]
    mean = sum(kept) / 5
    assert metrics["rollout_corr/rollout_is_mean"] == pytest.approx(mean)
    assert metrics["rollout_corr/rollout_is_eff_sample_size"] == pytest.approx(mean**2 / (sum(w * w for w in kept) / 5))


def test_sequence_weights_are_one_product_per_sample_broadcast_to_its_tokens():
    result = correct(rollout_is="sequence", rollout_is_threshold=2.0)
    assert result.weights is not None
    # sample 0: 3 * 0.8 = 2.4, truncated to 2; sample 1: 1 * 1.5 * 0.25 = 0.375
    torch.testing.assert_close(result.weights, torch.tensor([[2.0, 2.0, 0.0], [0.375, 0.375, 0.375]]))
    assert result.metrics["rollout_corr/rollout_is_ratio_fraction_high"] == pytest.approx(1 / 2)
    assert result.metrics["rollout_corr/rollout_is_ratio_fraction_low"] == pytest.approx(1 / 2)


def test_token_rejection_masks_each_token_outside_both_bounds():
    result = correct(rollout_rs="token", rollout_rs_threshold=2.0)  # lower defaults to 1 / 2
    assert result.weights is None
    assert result.keep.tolist() == [[False, True, False], [True, True, False]]
    assert result.metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(2 / 5)
    assert result.metrics["rollout_corr/rollout_rs_seq_masked_fraction"] == pytest.approx(1.0)


def test_sequence_rejection_drops_whole_samples_and_geometric_rejection_ignores_length():
    masked = correct(rollout_rs="sequence", rollout_rs_threshold=2.5, rollout_rs_threshold_lower=0.4)
    assert masked.keep.tolist() == [[True, True, False], [False, False, False]]  # 2.4 kept, 0.375 rejected
    assert masked.metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(3 / 5)
    assert masked.metrics["rollout_corr/rollout_rs_seq_masked_fraction"] == pytest.approx(1 / 2)
    # Geometric means: sqrt(2.4) = 1.549 (above 1.5) and 0.375 ** (1 / 3) = 0.721 (within [1 / 1.5, 1.5]).
    geometric = correct(rollout_rs="geometric", rollout_rs_threshold=1.5)
    assert geometric.keep.tolist() == [[False, False, False], [True, True, True]]


def test_the_is_threshold_bounds_rejection_unless_rejection_has_its_own():
    both = correct(rollout_is="token", rollout_is_threshold=5.0, rollout_rs="token")  # [1 / 5, 5]: all kept
    assert both.keep.tolist() == [[True, True, False], [True, True, True]]
    assert both.weights is not None and float(both.weights.max()) == pytest.approx(3.0)


def test_an_unknown_level_is_refused():
    with pytest.raises(ValueError, match="rollout_is must be one of"):
        correct(rollout_is="geometric")
    with pytest.raises(ValueError, match="rollout_rs must be one of"):
        correct(rollout_rs="tokens")


def test_metrics_stay_tensors_until_read_once_and_an_empty_batch_reports_none():
    result = correct(rollout_is="sequence", rollout_rs="token", rollout_rs_threshold=2.0)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in result.metric_tensors.values())
    assert result.metrics == {k: pytest.approx(float(v)) for k, v in result.metric_tensors.items()}
    empty = rollout_correction(train_logprobs(), ROLLOUT, torch.zeros_like(MASK), rollout_is="token")
    assert empty.metrics == {}
    assert not empty.keep.any() and empty.weights is not None and not empty.weights.any()
