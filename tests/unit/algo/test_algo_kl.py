"""Tests for rlmesh.algo.kl: each estimator's formula and direction, the reward penalty, the loss term, controllers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmesh.algo import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    agg_loss,
    apply_kl_penalty,
    get_kl_estimator,
    kl_loss,
    kl_penalty,
    make_kl_controller,
)

FAST = settings(max_examples=50, deadline=None)


def test_kl_estimators_match_hand_computed_case() -> None:
    # Policy p = 0.5 and reference q = 0.25 on the sampled token (d = ln 2), then the reverse (d = -ln 2).
    log_prob = torch.tensor([math.log(0.5), math.log(0.25)])
    ref_log_prob = torch.tensor([math.log(0.25), math.log(0.5)])
    d = math.log(2)
    expected = {
        "k1": [d, -d],
        "k2": [d**2 / 2, d**2 / 2],
        "k3": [0.5 - 1 + d, 2 - 1 - d],  # q/p - 1 - log(q/p)
        "abs": [d, d],
    }
    for kind, values in expected.items():
        torch.testing.assert_close(kl_penalty(log_prob, ref_log_prob, kind), torch.tensor(values), msg=kind)


def test_kl_aliases_name_the_same_estimators() -> None:
    assert get_kl_estimator("kl") is get_kl_estimator("k1")
    assert get_kl_estimator("mse") is get_kl_estimator("k2")
    assert get_kl_estimator("low_var_kl") is get_kl_estimator("k3")
    assert {"k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs"} <= set(KL_ESTIMATORS)


def test_unknown_kl_estimator_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; known: \[.*'low_var_kl'"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_k3_is_clamped_like_verl() -> None:
    # ref - log_prob = 50 is clamped to 20 before exp, and exp(20) - 21 is clamped to 10.
    assert kl_penalty(torch.tensor([-50.0]), torch.tensor([0.0]), "k3").item() == 10.0
    # ref - log_prob = -50 -> exp(-20) + 20 - 1 = 19.000000002 -> 10.
    assert kl_penalty(torch.tensor([50.0]), torch.tensor([0.0]), "k3").item() == 10.0
    # Inside the bounds nothing is clamped.
    assert kl_penalty(torch.tensor([1.0]), torch.tensor([0.0]), "k3").item() == pytest.approx(math.exp(-1) + 1 - 1)


def test_k1_and_k3_are_unbiased_for_kl_of_policy_to_reference() -> None:
    # Sampling tokens from the policy p, the sample means of k1 and k3 estimate KL(p || q), not KL(q || p).
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    log_prob, ref_log_prob = p.log()[tokens], q.log()[tokens]
    kl_p_q = (p * (p / q).log()).sum().item()  # 0.4982; KL(q || p) is 0.5697
    for kind in ("k1", "k3"):
        assert kl_penalty(log_prob, ref_log_prob, kind).mean().item() == pytest.approx(kl_p_q, abs=0.01), kind
    # k2 is biased but close for nearby distributions, and every sample of k2, k3 and abs is >= 0.
    for kind in ("k2", "k3", "abs"):
        assert (kl_penalty(log_prob, ref_log_prob, kind) >= 0).all(), kind


def test_apply_kl_penalty_matches_hand_computed_case() -> None:
    scores = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, math.nan]])
    log_prob = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, 5.0]])
    ref_log_prob = torch.tensor([[-1.5, -1.0, -2.0], [-0.5, -2.0, -5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, mean_kl = apply_kl_penalty(scores, log_prob, ref_log_prob, mask, kl_coef=0.1, kind="k1")
    # k1 per token: [0.5, 0, 1] and [-0.5, 0, (masked)]. Rewards = score - 0.1 * k1 on valid tokens.
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.9], [0.05, 2.0, 0.0]]))
    # Per-sequence means 0.5 and -0.25, averaged over the 2 sequences.
    assert mean_kl.item() == pytest.approx(0.125)


def test_apply_kl_penalty_leaves_empty_rows_out_of_the_mean() -> None:
    scores, log_prob, ref_log_prob = torch.zeros(2, 2), torch.zeros(2, 2), torch.full((2, 2), -1.0)
    _, mean_kl = apply_kl_penalty(scores, log_prob, ref_log_prob, torch.tensor([[1, 1], [0, 0]]), 0.1)
    assert mean_kl.item() == pytest.approx(1.0)


def test_kl_loss_is_the_aggregated_penalty_and_its_gradient_reaches_only_the_policy() -> None:
    log_prob = torch.tensor([[-1.0, -2.0, 3.0]], requires_grad=True)
    ref_log_prob = torch.tensor([[-1.5, -1.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss = kl_loss(log_prob, ref_log_prob, mask, kind="k2")
    # k2 on the valid tokens: 0.5 * 0.25 and 0.5 * 1, token mean.
    assert loss.item() == pytest.approx((0.125 + 0.5) / 2)
    expected = agg_loss(kl_penalty(log_prob, ref_log_prob, "k2"), mask, "token-mean")
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert ref_log_prob.grad is None
    assert log_prob.grad is not None
    torch.testing.assert_close(log_prob.grad, torch.tensor([[0.5 / 2, -1.0 / 2, 0.0]]))


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 5),
    length=st.integers(1, 6),
    kind=st.sampled_from(sorted(KL_ESTIMATORS)),
)
def test_padding_never_changes_the_kl_penalty_or_the_kl_loss(seed: int, batch: int, length: int, kind: str) -> None:
    generator = torch.Generator().manual_seed(seed)
    scores, log_prob, ref = (torch.randn(batch, length, generator=generator, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(batch, length, generator=generator) < 0.6
    wide_mask = torch.cat([mask, torch.zeros(batch, 2, dtype=torch.bool)], dim=1)

    def padded(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.where(mask, x, math.nan), torch.full((batch, 2), math.inf, dtype=x.dtype)], dim=1)

    rewards, mean_kl = apply_kl_penalty(scores, log_prob, ref, mask, 0.05, kind)
    wide_rewards, wide_mean_kl = apply_kl_penalty(padded(scores), padded(log_prob), padded(ref), wide_mask, 0.05, kind)
    torch.testing.assert_close(wide_rewards[:, :length], rewards)
    assert (wide_rewards[~wide_mask] == 0).all()
    torch.testing.assert_close(wide_mean_kl, mean_kl)
    # A finite policy log-prob beside a NaN reference on padding: neither the loss nor its gradient may see it.
    leaf = log_prob.clone().requires_grad_()
    wide_leaf = torch.cat([torch.where(mask, log_prob, -0.5), torch.full((batch, 2), -0.5)], dim=1).requires_grad_()
    loss, wide_loss = kl_loss(leaf, ref, mask, kind), kl_loss(wide_leaf, padded(ref), wide_mask, kind)
    torch.testing.assert_close(wide_loss, loss)
    loss.backward()
    wide_loss.backward()
    assert leaf.grad is not None and wide_leaf.grad is not None
    torch.testing.assert_close(wide_leaf.grad[:, :length], leaf.grad)
    assert (wide_leaf.grad[~wide_mask] == 0).all()


def test_fixed_controller_never_changes() -> None:
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=1000)
    assert controller.value == 0.05


def test_adaptive_controller_follows_the_ziegler_formula() -> None:
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # KL 9 vs target 6: error 0.5, clipped to 0.2; value *= 1 + 0.2 * 256 / 10000.
    controller.update(current_kl=9.0, n_steps=256)
    assert controller.value == pytest.approx(0.1 * 1.00512)
    # KL 6.6: error 0.1, not clipped.
    controller.update(current_kl=6.6, n_steps=1000)
    assert controller.value == pytest.approx(0.1 * 1.00512 * 1.01)
    # KL 0: error -1, clipped to -0.2, so the coefficient shrinks.
    controller.update(current_kl=0.0, n_steps=5000)
    assert controller.value == pytest.approx(0.1 * 1.00512 * 1.01 * 0.9)


def test_adaptive_controller_rejects_a_target_or_horizon_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match=r"target > 0 and horizon > 0, got target=0\.0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon=-1"):
        AdaptiveKLController(0.1, target=1.0, horizon=-1)


def test_make_kl_controller_builds_either_kind_and_state_round_trips() -> None:
    assert isinstance(make_kl_controller("fixed", 0.2), FixedKLController)
    adaptive = make_kl_controller("adaptive", 0.2, target=1.0, horizon=100)
    assert isinstance(adaptive, AdaptiveKLController)
    adaptive.update(current_kl=2.0, n_steps=10)
    restored = make_kl_controller("adaptive", 0.2, target=1.0, horizon=100)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value != 0.2
    with pytest.raises(ValueError, match="needs target and horizon"):
        make_kl_controller("adaptive", 0.2)
    with pytest.raises(ValueError, match=r"unknown KL controller 'pid'; known: \['adaptive', 'fixed'\]"):
        make_kl_controller("pid", 0.2)
