"""rollout/staleness and rollout/version_span: how old each trained sample's generator was, and syncs it spanned."""

from __future__ import annotations

import pytest

from rlmesh.metrics import staleness_metrics


def test_staleness_counts_versions_behind_the_trainer_and_spans_the_syncs_a_sample_saw():
    # The trainer holds version 2; three samples began on 0, 0 and 1, the second finished on 1; one has no version.
    metrics = staleness_metrics([0, 0, 1, None], [0, 1, 1, None], policy_version=2)
    assert metrics["rollout/staleness/max"] == 2 and metrics["rollout/staleness/min"] == 1
    assert metrics["rollout/staleness/mean"] == pytest.approx(5 / 3)
    assert metrics["rollout/staleness/frac_2"] == pytest.approx(2 / 3)
    assert metrics["rollout/staleness/frac_1"] == pytest.approx(1 / 3)
    assert "rollout/staleness/frac_0" not in metrics
    assert metrics["rollout/version_span/max"] == 1 and metrics["rollout/version_span/mean"] == pytest.approx(1 / 3)


def test_without_last_versions_no_sample_spans_a_sync_and_without_versions_there_is_nothing():
    metrics = staleness_metrics([3, 3], None, policy_version=3)
    assert metrics["rollout/staleness/max"] == 0 and metrics["rollout/staleness/frac_0"] == 1.0
    assert metrics["rollout/version_span/max"] == 0
    assert staleness_metrics([None, None], None, policy_version=3) == {}
