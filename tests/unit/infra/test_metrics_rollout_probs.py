"""verl's training/rollout_probs_diff metrics: engine against trainer token probabilities, on response tokens only."""

from __future__ import annotations

import math

import pytest
import torch

from rlmesh.metrics import rollout_probs_diff_metrics


def test_differences_are_of_probabilities_over_response_tokens_only():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.3, 0.3]]))
    rollout = torch.log(torch.tensor([[0.4, 0.2, 0.1], [0.1, 0.6, 0.3]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # the 0.8 difference sits on padding
    metrics = rollout_probs_diff_metrics(old, rollout, mask)
    diffs = [0.1, 0.0, 0.0, 0.3, 0.0]
    assert metrics["training/rollout_probs_diff_max"] == pytest.approx(0.3)
    assert metrics["training/rollout_probs_diff_mean"] == pytest.approx(sum(diffs) / 5)
    mean = sum(diffs) / 5
    assert metrics["training/rollout_probs_diff_std"] == pytest.approx(
        math.sqrt(sum((d - mean) ** 2 for d in diffs) / 5)
    )


def test_no_response_tokens_gives_no_metrics():
    zeros = torch.zeros(2, 3)
    assert rollout_probs_diff_metrics(zeros, zeros, torch.zeros(2, 3)) == {}
