"""rlmesh eval's metrics: unbiased pass@k, majority vote, bootstrap intervals, and their val-core names."""

from __future__ import annotations

import itertools
import math

import pytest

from rlmesh.metrics import bootstrap_interval, evaluation_metrics, majority_correct, pass_at_k, sample_counts


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """The share of k-subsets holding a correct sample: what the unbiased estimator computes in closed form."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("correct", [[True, False, False, False, True], [False] * 4, [True] * 3, [False, True]])
def test_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_sample(correct: list[bool]):
    for k in range(1, len(correct) + 1):
        assert pass_at_k(len(correct), sum(correct), k) == pytest.approx(brute_force_pass_at_k(correct, k))


def test_pass_at_k_refuses_k_beyond_the_samples():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_majority_vote_takes_the_most_predicted_answer_and_the_first_of_a_tie():
    assert majority_correct(["7", "3", "7"], [True, False, True]) == 1.0
    assert majority_correct(["3", "7", "3"], [False, True, False]) == 0.0
    assert majority_correct(["7", "3"], [True, False]) == 1.0  # tie: "7" came first
    assert majority_correct([None, "3", None], [True, False, True]) == 0.0  # no prediction, no vote
    assert majority_correct([None, None], [True, True]) == 0.0


def test_the_bootstrap_interval_brackets_the_mean_and_narrows_with_more_prompts():
    few = [1.0, 0.0] * 10
    many = [1.0, 0.0] * 500
    low, high = bootstrap_interval(few, 2000, 0.95, seed=1)
    assert low < 0.5 < high
    wide = high - low
    low, high = bootstrap_interval(many, 2000, 0.95, seed=1)
    assert low < 0.5 < high and high - low < wide / 3
    # about the normal approximation's half-width 1.96 * sqrt(p(1-p)/n) for 1,000 prompts
    assert (high - low) / 2 == pytest.approx(1.96 * math.sqrt(0.25 / 1000), rel=0.2)
    assert bootstrap_interval([0.3] * 5, 100, 0.9) == pytest.approx((0.3, 0.3))


def test_sample_counts_are_powers_of_two_and_n():
    assert sample_counts(1) == [1]
    assert sample_counts(4) == [1, 2, 4]
    assert sample_counts(6) == [1, 2, 4, 6]


def test_evaluation_metrics_per_data_source_under_val_core_names():
    # two prompts of source a (n = 2): one solved once, one never; one prompt of b solved twice
    sources = ["a", "a", "a", "a", "b", "b"]
    scores = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    preds = ["5", "4", "9", "8", "2", "2"]
    metrics = evaluation_metrics(sources, scores, None, preds, 2, resamples=0)
    assert metrics["val-core/a/acc/mean@2"] == pytest.approx(0.25)
    assert metrics["val-core/a/reward/mean@2"] == pytest.approx(0.25)
    assert metrics["val-core/a/acc/pass@1"] == pytest.approx(0.25)
    assert metrics["val-core/a/acc/pass@2"] == pytest.approx(0.5)
    assert metrics["val-core/a/acc/maj@1"] == pytest.approx(0.5)  # the first sample's answer
    assert metrics["val-core/a/acc/maj@2"] == pytest.approx(0.5)  # a tie of "5" and "4": "5" is first
    assert metrics["val-core/b/acc/pass@2"] == 1.0
    assert not any(key.endswith("/ci_low") for key in metrics)
    # acc, where reported, counts instead of the score; no predictions, no maj@k
    metrics = evaluation_metrics(sources, [0.1] * 6, [1.0, 0.0, 0.0, 0.0, None, None], None, 2, resamples=50)
    assert metrics["val-core/a/acc/mean@2"] == pytest.approx(0.25)
    assert metrics["val-core/b/acc/mean@2"] == pytest.approx(0.1)  # no acc: the score
    assert not any("maj@" in key for key in metrics)
    assert metrics["val-core/a/acc/mean@2/ci_low"] <= 0.25 <= metrics["val-core/a/acc/mean@2/ci_high"]


def test_samples_not_n_per_prompt_are_refused():
    with pytest.raises(ValueError, match="not 2 per prompt"):
        evaluation_metrics(["a"] * 3, [1.0] * 3, None, None, 2)


def test_a_prompt_whose_samples_predicted_nothing_counts_against_maj_at_k():
    metrics = evaluation_metrics(["a"] * 4, [1.0, 1.0, 0.0, 0.0], None, ["7", "7", None, None], 2, resamples=0)
    assert metrics["val-core/a/acc/maj@2"] == 0.5  # the second prompt has no votes: wrong, not left out
