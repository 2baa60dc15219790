"""Tests for rlmesh.algo.losses: PPO clip / clip-higher / dual clip, GSPO, loss aggregation, clipped value loss."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmesh.algo import (
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    agg_loss,
    explained_variance,
    get_policy_loss,
    register_policy_loss,
    value_loss,
)

FAST = settings(max_examples=50, deadline=None)


def log_probs_with_ratios(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(old_log_prob, log_prob) with exp(log_prob - old_log_prob) equal to `ratios`; log_prob requires grad."""
    old = torch.full((1, len(ratios)), -1.0, dtype=torch.float64)
    new = (old + torch.log(torch.tensor([ratios], dtype=torch.float64))).requires_grad_()
    return old, new


# ------------------------------------------------------------------------------------------------ PPO (vanilla)


def test_ppo_loss_matches_hand_computed_case() -> None:
    old, new = log_probs_with_ratios([1.5, 0.9, 0.5, 1.1])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, metrics = get_policy_loss("vanilla")(old, new, advantages, torch.ones(1, 4), clip_ratio=0.2)
    # Per token max(-A r, -A clip(r, 0.8, 1.2)): -1.2 (clipped), -0.9, 0.8 (clipped), 1.1. Token mean -0.05.
    assert loss.item() == pytest.approx(-0.05)
    assert metrics["pg_clipfrac"].item() == pytest.approx(0.5)
    assert metrics["pg_clipfrac_lower"].item() == 0.0
    expected_kl = -sum(math.log(r) for r in [1.5, 0.9, 0.5, 1.1]) / 4
    assert metrics["ppo_kl"].item() == pytest.approx(expected_kl)
    assert get_policy_loss("ppo") is get_policy_loss("vanilla")


def test_ppo_clip_higher_uses_separate_low_and_high_bounds() -> None:
    old, new = log_probs_with_ratios([1.25, 1.3, 0.75])
    advantages = torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64)
    loss, metrics = get_policy_loss("vanilla")(
        old, new, advantages, torch.ones(1, 3), clip_ratio_low=0.2, clip_ratio_high=0.28
    )
    # DAPO bounds [0.8, 1.28]: 1.25 stays (-1.25), 1.3 clips to 1.28 (-1.28), 0.75 clips to 0.8 (0.8).
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8) / 3)
    assert metrics["pg_clipfrac"].item() == pytest.approx(2 / 3)


def test_dual_clip_bounds_the_loss_of_negative_advantages() -> None:
    old, new = log_probs_with_ratios([5.0, 5.0, 2.0])
    advantages = torch.tensor([[-1.0, 1.0, -1.0]], dtype=torch.float64)
    loss, metrics = get_policy_loss("vanilla")(old, new, advantages, torch.ones(1, 3), clip_ratio_c=3.0)
    # A < 0, r = 5 > c: min(5, 3) = 3. A > 0, r = 5: plain clip, -1.2. A < 0, r = 2 < c: 2, no dual clip.
    assert loss.item() == pytest.approx((3.0 - 1.2 + 2.0) / 3)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(1 / 3)
    loss_without, metrics_without = get_policy_loss("vanilla")(
        old, new, advantages, torch.ones(1, 3), clip_ratio_c=None
    )
    assert loss_without.item() == pytest.approx((5.0 - 1.2 + 2.0) / 3)
    assert metrics_without["pg_clipfrac_lower"].item() == 0.0


def test_dual_clip_constant_must_exceed_one() -> None:
    old, new = log_probs_with_ratios([1.0])
    with pytest.raises(ValueError, match=r"clip_ratio_c must be > 1.*got 1.0"):
        get_policy_loss("vanilla")(old, new, torch.ones(1, 1), torch.ones(1, 1), clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="clip_ratio_low < 1"):
        get_policy_loss("vanilla")(old, new, torch.ones(1, 1), torch.ones(1, 1), clip_ratio_low=1.5)


def test_gradients_of_the_clipped_loss_vanish_where_the_clip_is_active() -> None:
    # Tokens: A>0 above 1+eps (clipped), A<0 below 1-eps (clipped), A<0 above c (dual clip), then two unclipped.
    ratios = [1.5, 0.5, 4.0, 1.1, 0.95]
    old, new = log_probs_with_ratios(ratios)
    advantages = torch.tensor([[1.0, -1.0, -1.0, 2.0, -3.0]], dtype=torch.float64)
    loss, _ = get_policy_loss("vanilla")(old, new, advantages, torch.ones(1, 5), clip_ratio=0.2, clip_ratio_c=3.0)
    loss.backward()
    assert new.grad is not None
    # d(-A r)/d log_prob = -A r on unclipped tokens, divided by the 5 tokens of the token mean.
    expected = torch.tensor([[0.0, 0.0, 0.0, -2.0 * 1.1 / 5, 3.0 * 0.95 / 5]], dtype=torch.float64)
    torch.testing.assert_close(new.grad, expected)


def test_log_ratio_is_clamped_against_overflow() -> None:
    old = torch.tensor([[-1000.0, 0.0]])
    new = torch.tensor([[0.0, 0.0]], requires_grad=True)
    advantages = torch.tensor([[-1.0, 1.0]])
    for name in ("vanilla", "gspo"):
        loss, _ = get_policy_loss(name)(old, new, advantages, torch.ones(1, 2), clip_ratio_c=None)
        assert torch.isfinite(loss), name
        loss.backward()
        assert new.grad is not None and torch.isfinite(new.grad).all(), name
        new.grad = None
    loss, _ = get_policy_loss("vanilla")(old, new, advantages, torch.ones(1, 2), clip_ratio_c=None)
    # Token 0: ratio exp(20) (not exp(1000) = inf) and A < 0: loss exp(20). Token 1: ratio 1, loss -1.
    assert loss.item() == pytest.approx((math.exp(20) - 1) / 2, rel=1e-6)


# ------------------------------------------------------------------------------------------------------- GSPO


@pytest.mark.parametrize("log_ratio", [10.5, 14.3, 19.9])
def test_gspo_bounds_its_sequence_log_ratio_at_10_like_verl(log_ratio: float) -> None:
    # Between 10 and 20 (inside the PPO bound) a negative advantage makes the loss -A * s itself: with the PPO bound
    # it would reach 0.5 * exp(14.3) = 8e5; verl's bound of 10 keeps it at 0.5 * exp(10) = 1.1e4, without gradient.
    old = torch.zeros(1, 3, dtype=torch.float64)
    new = torch.full((1, 3), log_ratio, dtype=torch.float64, requires_grad=True)
    advantages = torch.full((1, 3), -0.5, dtype=torch.float64)
    loss, metrics = get_policy_loss("gspo")(old, new, advantages, torch.ones(1, 3), clip_ratio=0.2)
    assert loss.item() == pytest.approx(0.5 * math.exp(10.0))
    assert metrics["pg_clipfrac"].item() == 0.0  # the unclipped term is the larger one: its value, not the clip's
    loss.backward()
    assert new.grad is not None and (new.grad == 0).all()
    # Just under the bound the ratio is left alone, and the gradient flows.
    below = torch.full((1, 3), 9.5, dtype=torch.float64, requires_grad=True)
    loss, _ = get_policy_loss("gspo")(old, below, advantages, torch.ones(1, 3), clip_ratio=0.2)
    assert loss.item() == pytest.approx(0.5 * math.exp(9.5))
    loss.backward()
    assert below.grad is not None and (below.grad > 0).all()


def test_gspo_matches_hand_computed_case() -> None:
    old = torch.zeros(2, 2, dtype=torch.float64)
    new = torch.tensor([[0.1, 0.3], [-0.2, 7.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    gspo = get_policy_loss("gspo")
    # s_1 = exp(mean(0.1, 0.3)) = exp(0.2) = 1.2214, s_2 = exp(-0.2) = 0.8187 (its masked 7.0 is ignored).
    loss, metrics = gspo(old, new, advantages, mask, clip_ratio=0.25)
    # Bounds [0.75, 1.25] clip neither: seq-mean-token-mean of (-s_1, +s_2).
    assert loss.item() == pytest.approx((-math.exp(0.2) + math.exp(-0.2)) / 2)
    assert metrics["pg_clipfrac"].item() == 0.0
    loss, metrics = gspo(old, new, advantages, mask, clip_ratio=0.1)
    # Bounds [0.9, 1.1]: s_1 clips to 1.1 (-1.1), s_2 = 0.8187 < 0.9 with A < 0 clips to 0.9 (+0.9).
    assert loss.item() == pytest.approx((-1.1 + 0.9) / 2)
    assert metrics["pg_clipfrac"].item() == 1.0
    assert metrics["ppo_kl"].item() == pytest.approx(-(0.1 + 0.3 - 0.2) / 3)


def test_gspo_gradient_is_the_sequence_level_gradient() -> None:
    old = torch.zeros(2, 3, dtype=torch.float64)
    new = torch.tensor([[0.1, 0.3, -0.1], [-0.2, 0.0, 5.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([[2.0], [-1.0]], dtype=torch.float64).expand(2, 3)
    loss, _ = get_policy_loss("gspo")(old, new, advantages, mask, clip_ratio=0.5)
    loss.backward()
    assert new.grad is not None
    # -(1/S) A_i s_i (1/L_i) d log pi_it: the same on every valid token of a sequence, as in the GSPO paper.
    s = torch.exp(torch.tensor([0.3 / 3, -0.2 / 2], dtype=torch.float64))
    expected_per_sequence = -advantages[:, 0] * s / torch.tensor([3.0, 2.0], dtype=torch.float64) / 2
    torch.testing.assert_close(new.grad, expected_per_sequence[:, None] * mask)


def test_gspo_loss_equals_the_sequence_level_formula_with_sequence_advantages() -> None:
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    new = old + 0.05 * torch.randn(4, 5, generator=generator, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=generator) < 0.8
    mask[:, 0] = True
    sequence_advantages = torch.randn(4, generator=generator, dtype=torch.float64)
    loss, _ = get_policy_loss("gspo")(old, new, sequence_advantages[:, None].expand(4, 5), mask, clip_ratio=0.03)
    s = torch.exp(((new - old) * mask).sum(-1) / mask.sum(-1))
    paper = -torch.minimum(s * sequence_advantages, s.clamp(0.97, 1.03) * sequence_advantages).mean()
    assert loss.item() == pytest.approx(paper.item())


def test_policy_loss_registry_names_and_errors() -> None:
    assert {"vanilla", "ppo", "gspo"} <= set(POLICY_LOSSES)
    with pytest.raises(ValueError, match=r"unknown policy loss 'gpso'; known: \[.*'gspo'"):
        get_policy_loss("gpso")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("gspo")(get_policy_loss("vanilla"))


# Padding fills for (old_log_prob, log_prob, advantages / returns): NaN and inf everywhere; a finite log-prob in the
# clamp range beside a NaN advantage, the case where 0 * NaN would reach the model's gradient; large finite values.
PADDING_FILLS = [(math.inf, math.nan, math.nan), (0.0, -0.25, math.nan), (-1e9, 1e9, 1e9)]


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    length=st.integers(1, 6),
    extra=st.integers(1, 3),
    mode=st.sampled_from(LOSS_AGG_MODES),
    name=st.sampled_from(["vanilla", "gspo"]),
    fills=st.sampled_from(PADDING_FILLS),
)
def test_padding_never_changes_a_policy_loss_or_its_gradient(
    seed: int, batch: int, length: int, extra: int, mode: str, name: str, fills: tuple[float, float, float]
) -> None:
    generator = torch.Generator().manual_seed(seed)
    old = torch.randn(batch, length, generator=generator, dtype=torch.float64)
    new = old + 0.3 * torch.randn(batch, length, generator=generator, dtype=torch.float64)
    advantages = torch.randn(batch, length, generator=generator, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=generator) < 0.7

    def padded(x: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.cat([torch.where(mask, x, fill), torch.full((batch, extra), fill, dtype=x.dtype)], dim=1)

    new_leaf = new.clone().requires_grad_()
    wide_leaf = padded(new, fills[1]).requires_grad_()
    wide_mask = torch.cat([mask, torch.zeros(batch, extra, dtype=torch.bool)], dim=1)
    loss_fn = get_policy_loss(name)
    loss, metrics = loss_fn(old, new_leaf, advantages, mask, loss_agg_mode=mode, norm_constant=8.0)
    wide_loss, wide_metrics = loss_fn(
        padded(old, fills[0]), wide_leaf, padded(advantages, fills[2]), wide_mask, loss_agg_mode=mode, norm_constant=8.0
    )
    torch.testing.assert_close(wide_loss, loss)
    for key in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
        torch.testing.assert_close(wide_metrics[key], metrics[key])
    loss.backward()
    wide_loss.backward()
    assert new_leaf.grad is not None and wide_leaf.grad is not None
    torch.testing.assert_close(wide_leaf.grad[:, :length], new_leaf.grad)
    assert (wide_leaf.grad[~wide_mask] == 0).all()


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    length=st.integers(1, 6),
    mode=st.sampled_from(LOSS_AGG_MODES),
    fills=st.sampled_from(PADDING_FILLS),
)
def test_padding_never_changes_the_value_loss_or_its_gradient(
    seed: int, batch: int, length: int, mode: str, fills: tuple[float, float, float]
) -> None:
    generator = torch.Generator().manual_seed(seed)
    old_values, values, returns = (torch.randn(batch, length, generator=generator, dtype=torch.float64) for _ in "ovr")
    mask = torch.rand(batch, length, generator=generator) < 0.7
    wide_mask = torch.cat([mask, torch.zeros(batch, 2, dtype=torch.bool)], dim=1)

    def padded(x: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.cat([torch.where(mask, x, fill), torch.full((batch, 2), fill, dtype=x.dtype)], dim=1)

    leaf, wide_leaf = values.clone().requires_grad_(), padded(values, fills[1]).requires_grad_()
    loss, metrics = value_loss(leaf, old_values, returns, mask, 0.2, mode, norm_constant=8.0)
    wide_loss, wide_metrics = value_loss(
        wide_leaf, padded(old_values, fills[0]), padded(returns, fills[2]), wide_mask, 0.2, mode, norm_constant=8.0
    )
    torch.testing.assert_close(wide_loss, loss)
    torch.testing.assert_close(wide_metrics["vf_clipfrac"], metrics["vf_clipfrac"])
    loss.backward()
    wide_loss.backward()
    assert leaf.grad is not None and wide_leaf.grad is not None
    torch.testing.assert_close(wide_leaf.grad[:, :length], leaf.grad)
    assert (wide_leaf.grad[~wide_mask] == 0).all()


# ------------------------------------------------------------------------------------------------ aggregation


def test_every_aggregation_mode_matches_hand_computed_case() -> None:
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert agg_loss(losses, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert agg_loss(losses, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert agg_loss(losses, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert agg_loss(losses, mask, "seq-mean-token-sum-norm", norm_constant=4).item() == pytest.approx((6 + 4) / 2 / 4)
    assert set(LOSS_AGG_MODES) == {"token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"}


def test_aggregation_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown loss_agg_mode 'mean'; known: \['token-mean'"):
        agg_loss(torch.ones(1, 1), torch.ones(1, 1), "mean")
    with pytest.raises(ValueError, match="needs a positive norm_constant, got None"):
        agg_loss(torch.ones(1, 1), torch.ones(1, 1), "seq-mean-token-sum-norm")


def test_aggregation_of_an_empty_mask_is_zero() -> None:
    for mode in LOSS_AGG_MODES:
        assert agg_loss(torch.ones(2, 2), torch.zeros(2, 2), mode, norm_constant=2).item() == 0.0


def random_losses(seed: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    losses = torch.randn(batch, length, generator=generator, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=generator) < 0.6
    return losses, mask


@FAST
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), length=st.integers(1, 8))
def test_aggregation_modes_differ_exactly_as_their_formulas_say(seed: int, batch: int, length: int) -> None:
    losses, mask = random_losses(seed, batch, length)
    lengths = mask.sum(-1)
    n_tokens, n_sequences = lengths.sum().item(), (lengths > 0).sum().item()
    total = (losses * mask).sum().item()
    token_mean = agg_loss(losses, mask, "token-mean").item()
    seq_sum = agg_loss(losses, mask, "seq-mean-token-sum").item()
    seq_mean = agg_loss(losses, mask, "seq-mean-token-mean").item()
    seq_sum_norm = agg_loss(losses, mask, "seq-mean-token-sum-norm", norm_constant=7.0).item()
    # token-mean and seq-mean-token-sum share the numerator (every valid loss summed), with different counts.
    assert token_mean * n_tokens == pytest.approx(total)
    assert seq_sum * n_sequences == pytest.approx(total)
    # seq-mean-token-sum-norm is seq-mean-token-sum over the constant.
    assert seq_sum_norm == pytest.approx(seq_sum / 7.0)
    # seq-mean-token-mean averages each sequence's own token mean.
    per_sequence = [losses[i][mask[i]].mean().item() for i in range(batch) if lengths[i] > 0]
    assert seq_mean == pytest.approx(sum(per_sequence) / max(len(per_sequence), 1))
    # With equal lengths L the modes collapse: token-mean = seq-mean-token-mean = seq-mean-token-sum / L.
    full = torch.ones_like(mask)
    assert agg_loss(losses, full, "token-mean").item() == pytest.approx(agg_loss(losses, full, "seq-mean-token-mean"))
    assert agg_loss(losses, full, "seq-mean-token-sum").item() == pytest.approx(
        length * agg_loss(losses, full, "token-mean").item()
    )


@FAST
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(2, 6), length=st.integers(1, 6), split=st.integers(1, 5))
def test_aggregation_with_a_global_denominator_sums_over_micro_batches(
    seed: int, batch: int, length: int, split: int
) -> None:
    losses, mask = random_losses(seed, batch, length)
    split = min(split, batch - 1)
    for mode in LOSS_AGG_MODES:
        full = agg_loss(losses, mask, mode, norm_constant=5.0)
        count = mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum()
        parts = [
            agg_loss(losses[rows], mask[rows], mode, norm_constant=5.0, denominator=count)
            for rows in (slice(0, split), slice(split, batch))
        ]
        torch.testing.assert_close(sum(parts), full, msg=mode)


# ------------------------------------------------------------------------------------------------- value loss


def test_value_loss_matches_hand_computed_case() -> None:
    values = torch.tensor([[1.5, 0.9, 0.5, 42.0]], requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # Token 0: V_clip = 1.2, max(0.25, 0.64) = 0.64 (clipped term larger). Token 1: inside the clip, 0.81.
    # Token 2: V_clip = 0.8, max(2.25, 1.44) = 2.25 (unclipped larger). loss = 0.5 * mean.
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert metrics["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert values.grad is not None
    # Gradient 0 where the clipped term wins; (V - R) / 3 elsewhere; 0 on padding.
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.9 / 3, -1.5 / 3, 0.0]]))


def test_value_loss_respects_the_aggregation_mode() -> None:
    values, old, returns = torch.tensor([[1.0, 1.0], [3.0, 0.0]]), torch.zeros(2, 2), torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = value_loss(values, old, returns, mask, cliprange_value=10.0, agg_mode="seq-mean-token-mean")
    assert loss.item() == pytest.approx(0.5 * (1.0 + 9.0) / 2)


def test_explained_variance_matches_hand_computed_cases() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0)
    # Residuals [1, 0, -1] around mean 0: var 2/3; returns var 2/3 too, so 1 - 1 = 0. Residuals [0, 0, 1]:
    # var 2/9; 1 - (2/9) / (2/3) = 2/3.
    assert explained_variance(torch.tensor([[0.0, 2.0, 4.0, 0.0]]), returns, mask).item() == pytest.approx(0.0)
    assert explained_variance(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), returns, mask).item() == pytest.approx(2 / 3)
    assert math.isnan(explained_variance(torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3)).item())
