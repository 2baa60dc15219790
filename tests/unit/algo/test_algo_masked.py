"""Tests for rlmesh.algo.masked: hand-computed cases, NaN in padding, properties against torch on valid elements."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmesh.algo import masked_mean, masked_sum, masked_var, masked_whiten

FAST = settings(max_examples=60, deadline=None)


def random_values_and_mask(seed: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=generator, dtype=torch.float64) * 3
    mask = torch.rand(rows, cols, generator=generator) < 0.6
    mask[0, 0] = mask[-1, -1] = True  # whitening needs two valid elements
    if rows * cols == 1:
        mask = torch.ones_like(mask)
    return values, mask


def test_masked_sum_and_mean_match_hand_computed_case() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(values, mask).item() == 7.0
    assert masked_mean(values, mask).item() == pytest.approx(7.0 / 3)
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_sum(values, mask, dim=0, keepdim=True), torch.tensor([[5.0, 2.0, 0.0]]))


def test_masked_mean_weights_by_a_fractional_mask() -> None:
    values = torch.tensor([2.0, 4.0])
    assert masked_mean(values, torch.tensor([0.25, 0.75])).item() == pytest.approx((0.5 + 3.0) / 1.0)


def test_masked_mean_of_an_empty_row_is_zero_not_nan() -> None:
    values = torch.tensor([[1.0, 2.0], [float("nan"), 7.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([1.5, 0.0]))
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_masked_var_matches_hand_computed_case() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    # mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(5 / 4)
    assert masked_var(values, mask, unbiased=True).item() == pytest.approx(5 / 3)


def test_masked_var_unbiased_with_one_valid_element_raises() -> None:
    with pytest.raises(ValueError, match="at least 2 valid elements, got 1"):
        masked_var(torch.tensor([1.0, 2.0]), torch.tensor([1, 0]))
    assert masked_var(torch.tensor([1.0, 2.0]), torch.tensor([1, 0]), unbiased=False).item() == 0.0


def test_masked_whiten_matches_hand_computed_case() -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 50.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # mean 2, unbiased var ((1 + 0 + 1) / 2) = 1, so the valid values map to -1, 0, 1 and padding to 0.
    torch.testing.assert_close(masked_whiten(values, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


def test_masked_whiten_without_shift_mean_adds_the_mean_back() -> None:
    values = torch.tensor([2.0, 4.0, 6.0, -9.0])
    mask = torch.tensor([1, 1, 1, 0])
    # mean 4, unbiased var 4, std 2: (x - 4) / 2 + 4
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False), torch.tensor([3.0, 4.0, 5.0, 0.0]))


def test_masked_reductions_ignore_nan_and_inf_in_padding() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, float("nan"), float("inf"), -float("inf")])
    mask = torch.tensor([1, 1, 1, 0, 0, 0])
    assert masked_sum(values, mask).item() == 6.0
    assert masked_mean(values, mask).item() == 2.0
    assert masked_var(values, mask).item() == 1.0
    torch.testing.assert_close(masked_whiten(values, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def test_masked_mean_gradient_is_finite_with_nan_padding() -> None:
    values = torch.tensor([1.0, float("nan")], requires_grad=True)
    masked_mean(values, torch.tensor([1, 0])).backward()
    assert values.grad is not None
    torch.testing.assert_close(values.grad, torch.tensor([1.0, 0.0]))


@FAST
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), cols=st.integers(1, 7))
def test_masked_reductions_equal_torch_on_the_selected_elements(seed: int, rows: int, cols: int) -> None:
    values, mask = random_values_and_mask(seed, rows, cols)
    selected = values[mask]
    torch.testing.assert_close(masked_sum(values, mask), selected.sum())
    torch.testing.assert_close(masked_mean(values, mask), selected.mean())
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), selected.var(correction=0))
    if selected.numel() >= 2:
        torch.testing.assert_close(masked_var(values, mask), selected.var())
        whitened = masked_whiten(values, mask)
        assert (whitened[~mask] == 0).all()
        torch.testing.assert_close(whitened[mask], (selected - selected.mean()) / torch.sqrt(selected.var() + 1e-8))
    for row in range(rows):
        expected = values[row][mask[row]].mean() if mask[row].any() else torch.tensor(0.0, dtype=values.dtype)
        assert masked_mean(values, mask, dim=-1)[row].item() == pytest.approx(expected.item())


@FAST
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), cols=st.integers(1, 7))
def test_masked_reductions_do_not_depend_on_padding_values(seed: int, rows: int, cols: int) -> None:
    values, mask = random_values_and_mask(seed, rows, cols)
    garbage = torch.where(mask, values, torch.full_like(values, math.nan))
    garbage[~mask & (torch.arange(cols) % 2 == 0)] = 1e30
    assert masked_sum(garbage, mask).item() == masked_sum(values, mask).item()
    assert masked_mean(garbage, mask).item() == masked_mean(values, mask).item()
    if mask.sum() >= 2:
        torch.testing.assert_close(masked_whiten(garbage, mask), masked_whiten(values, mask))
