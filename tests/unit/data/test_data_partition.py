"""balanced_partition and first_fit_bins: hand-computed cases, their guarantees as properties, and their errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmesh.data import balanced_partition
from rlmesh.data.batch import first_fit_bins


def test_hand_computed_case():
    # Sorted rows of 2: (3,4) (5,6) (7,8). Merging the first two pairs 4 with 5 and 3 with 6 -> sums (9, 9); merging
    # (7,8) with that pairs 8 with 9 and 7 with 9 -> (17, 16). Weights 8..3 sit at indices 0..5.
    assert balanced_partition([8, 7, 6, 5, 4, 3], 2) == [[0, 3, 4], [1, 2, 5]]


def test_more_parts_than_items_leaves_empty_parts():
    assert balanced_partition([5, 9], 3) == [[0], [1], []]
    assert balanced_partition([], 2) == [[], []]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_parts >= 1, got 0"):
        balanced_partition([1, 2], 0)
    with pytest.raises(ValueError, match=r"indices \[1\] are negative"):
        balanced_partition([1, -2, 3], 2)


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.integers(min_value=0, max_value=10_000), max_size=80), num_parts=st.integers(1, 9))
def test_partition_properties(weights, num_parts):
    groups = balanced_partition(weights, num_parts)
    assert len(groups) == num_parts
    assert sorted(i for group in groups for i in group) == list(range(len(weights)))
    assert all(group == sorted(group) for group in groups)
    sizes = [len(group) for group in groups]
    assert max(sizes) - min(sizes) <= 1
    sums = [sum(weights[i] for i in group) for group in groups]
    # Each merge keeps the spread within the larger of the two merged spreads, so the final spread is bounded by the
    # spread of one sorted row: max weight - min weight (placeholders of weight 0 join when n % num_parts != 0).
    lightest = 0 if len(weights) % num_parts else min(weights, default=0)
    assert max(sums) - min(sums) <= max(weights, default=0) - lightest


def test_first_fit_bins_hand_computed_case():
    # Longest first: 7 opens bin 0 and 5 bin 1; 4 joins bin 1 (9), 3 bin 0 (10); 2 fits neither and opens bin 2;
    # 1 joins bin 1 (10).
    assert first_fit_bins([4, 7, 1, 3, 5, 2], 10) == [[1, 3], [0, 2, 4], [5]]


@given(st.lists(st.integers(0, 30), max_size=40), st.integers(30, 60))
@settings(max_examples=200, deadline=None)
def test_first_fit_bins_hold_every_item_once_within_capacity(lengths: list[int], capacity: int):
    bins = first_fit_bins(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert all(b == sorted(b) for b in bins)
    # First fit never leaves two bins that could have been one: every pair together overflows.
    sums = [sum(lengths[i] for i in b) for b in bins]
    assert all(sums[i] + sums[j] > capacity for i in range(len(sums)) for j in range(i + 1, len(sums)))


def test_first_fit_bins_refuse_items_longer_than_a_bin():
    with pytest.raises(ValueError, match=r"items \[1\] are longer than the bin capacity 4"):
        first_fit_bins([3, 5], 4)
    with pytest.raises(ValueError, match="capacity >= 1"):
        first_fit_bins([1], 0)
