"""rlmesh.algo.policy_objective against hand computations: PG loss, entropy bonus, KL loss, aggregation, denominator."""

import math
from typing import Any

import pytest
import torch

from rlmesh.algo import PolicyObjective, policy_objective

NAN = math.nan


def tiny_batch() -> dict[str, torch.Tensor]:
    """Two responses of 2 and 1 tokens in width 3; padding holds NaN (finite log-probs: a model gives those).

    Token by token, PPO with clip 0.2 on ratios 1.5, 0.9 and 0.5 and advantages 1, 2 and -0.5 gives
    l = max(-A r, -A clip(r, 0.8, 1.2)) = -1.2 (clipped), -1.8, 0.4 (clipped); dual clip (c = 3) stays off.
    Entropy 0.5, 1.0 and 2.0; the reference is chosen so that k1 = log_prob - ref_log_prob = 0.1, -0.2 and 0.3.
    """
    log_prob = torch.tensor([[math.log(1.5), math.log(0.9), 7.0], [math.log(0.5), 9.0, 9.0]], dtype=torch.float64)
    return {
        "log_prob": log_prob.requires_grad_(),
        "old_log_prob": torch.tensor([[0.0, 0.0, NAN], [0.0, NAN, NAN]], dtype=torch.float64),
        "advantages": torch.tensor([[1.0, 2.0, NAN], [-0.5, NAN, NAN]], dtype=torch.float64),
        "response_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
        "entropy": torch.tensor([[0.5, 1.0, NAN], [2.0, NAN, NAN]], dtype=torch.float64).requires_grad_(),
        "ref_log_prob": torch.tensor(
            [[math.log(1.5) - 0.1, math.log(0.9) + 0.2, NAN], [math.log(0.5) - 0.3, NAN, NAN]], dtype=torch.float64
        ),
    }


def objective(batch: dict[str, torch.Tensor], **settings: Any) -> PolicyObjective:
    return policy_objective(
        batch["log_prob"],
        batch["old_log_prob"],
        batch["advantages"],
        batch["response_mask"],
        **settings,
    )


# Per aggregation mode, by hand from the per-token values in tiny_batch's docstring: (PG, H, KL).
HAND = {
    # every valid token weighs 1/3
    "token-mean": ((-1.2 - 1.8 + 0.4) / 3, (0.5 + 1.0 + 2.0) / 3, (0.1 - 0.2 + 0.3) / 3),
    # each sequence's token mean, then the mean of the 2 sequences
    "seq-mean-token-mean": (((-1.2 - 1.8) / 2 + 0.4) / 2, ((0.5 + 1.0) / 2 + 2.0) / 2, ((0.1 - 0.2) / 2 + 0.3) / 2),
}


@pytest.mark.parametrize("mode", sorted(HAND))
def test_the_pg_loss_alone_when_neither_entropy_nor_a_reference_is_used(mode: str) -> None:
    batch = tiny_batch()
    result = objective(batch, loss_agg_mode=mode, clip_ratio=0.2)
    pg, _, _ = HAND[mode]
    assert result.loss.item() == pytest.approx(pg)
    assert set(result.loss_terms) == {"pg_loss"} and result.loss_terms["pg_loss"].item() == pytest.approx(pg)
    assert set(result.token_means) == {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"}
    assert result.token_means["pg_clipfrac"].item() == pytest.approx(2 / 3)


def test_importance_weights_scale_each_tokens_policy_loss_and_its_gradient_only() -> None:
    weights = torch.tensor([[2.0, 0.5, NAN], [0.0, NAN, NAN]], dtype=torch.float64)
    batch = tiny_batch()
    result = objective(batch, clip_ratio=0.2, token_weights=weights, entropy=batch["entropy"], entropy_coeff=0.1)
    # l = -1.2 (clipped), -1.8, 0.4 weighted by 2, 0.5 and 0; the entropy bonus is not weighted
    assert result.loss_terms["pg_loss"].item() == pytest.approx((2 * -1.2 + 0.5 * -1.8) / 3)
    assert result.loss.item() == pytest.approx((2 * -1.2 + 0.5 * -1.8) / 3 - 0.1 * (0.5 + 1.0 + 2.0) / 3)
    assert result.token_means["pg_clipfrac"].item() == pytest.approx(1 / 3)  # the weight-0 token clips no more
    result.loss.backward()
    assert batch["log_prob"].grad is not None
    # d/d log_prob of -A r w at the unclipped token (r = 0.9, A = 2, w = 0.5), over 3 tokens; 0 where clipped
    assert batch["log_prob"].grad[0].tolist() == pytest.approx([0.0, -2 * 0.9 * 0.5 / 3, 0.0])


@pytest.mark.parametrize("mode", sorted(HAND))
def test_entropy_bonus_and_kl_loss_enter_with_their_coefficients(mode: str) -> None:
    batch = tiny_batch()
    result = objective(
        batch,
        loss_agg_mode=mode,
        entropy=batch["entropy"],
        entropy_coeff=0.1,
        ref_log_prob=batch["ref_log_prob"],
        kl_loss_coef=0.5,
        kl_loss_type="k1",
    )
    pg, entropy, kl = HAND[mode]
    assert result.loss.item() == pytest.approx(pg - 0.1 * entropy + 0.5 * kl)
    assert result.loss_terms["pg_loss"].item() == pytest.approx(pg)
    assert result.loss_terms["kl_loss"].item() == pytest.approx(kl)
    # Reported per token whatever the mode: the mean over the 3 valid tokens.
    assert result.token_means["entropy"].item() == pytest.approx(3.5 / 3)
    assert all(not term.requires_grad for term in [*result.loss_terms.values(), *result.token_means.values()])


def test_an_entropy_with_coefficient_zero_is_reported_but_not_in_the_loss() -> None:
    batch = tiny_batch()
    result = objective(batch, entropy=batch["entropy"], entropy_coeff=0.0)
    assert result.loss.item() == pytest.approx(HAND["token-mean"][0])
    assert result.token_means["entropy"].item() == pytest.approx(3.5 / 3)
    with pytest.raises(ValueError, match=r"entropy_coeff=0.1 needs the entropy"):
        objective(batch, entropy_coeff=0.1)


def test_the_gradient_reaches_the_policy_and_the_entropy_on_valid_tokens_only() -> None:
    batch = tiny_batch()
    objective(
        batch,
        entropy=batch["entropy"],
        entropy_coeff=0.1,
        ref_log_prob=batch["ref_log_prob"].requires_grad_(),
        kl_loss_coef=0.5,
        kl_loss_type="k1",
    ).loss.backward()
    # PG: only the unclipped token (r = 0.9, A = 2) has a gradient, -A r / 3; k1 adds kl_loss_coef / 3 everywhere.
    expected = torch.tensor([[0.5 / 3, (-1.8 + 0.5) / 3, 0.0], [0.5 / 3, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(batch["log_prob"].grad, expected)
    entropy_grad = torch.tensor([[-0.1 / 3, -0.1 / 3, 0.0], [-0.1 / 3, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(batch["entropy"].grad, entropy_grad)
    assert batch["ref_log_prob"].grad is None


def test_a_mini_batch_denominator_replaces_the_batch_s_own_count() -> None:
    # Two micro-batches (one row each) with the mini-batch's count add up to the mini-batch's loss.
    settings = {"entropy_coeff": 0.1, "kl_loss_coef": 0.5, "kl_loss_type": "k1"}
    for mode, count in (("token-mean", 3), ("seq-mean-token-mean", 2)):
        batch = tiny_batch()
        whole = objective(
            batch, loss_agg_mode=mode, entropy=batch["entropy"], ref_log_prob=batch["ref_log_prob"], **settings
        )
        parts = []
        for row in (0, 1):
            part = {key: value.detach()[row : row + 1] for key, value in batch.items()}
            parts.append(
                objective(
                    part,
                    loss_agg_mode=mode,
                    entropy=part["entropy"],
                    ref_log_prob=part["ref_log_prob"],
                    denominator=count,
                    **settings,
                ).loss
            )
        assert sum(parts).item() == pytest.approx(whole.loss.item()), mode
        # Without the shared count each part is its own mean, and their sum is not the mini-batch loss.
        alone = [
            objective(
                {key: value.detach()[row : row + 1] for key, value in batch.items()}, loss_agg_mode=mode
            ).loss.item()
            for row in (0, 1)
        ]
        assert sum(alone) != pytest.approx(HAND[mode][0]), mode


def test_dr_grpo_divides_by_the_padded_width_unless_given_a_constant() -> None:
    batch = tiny_batch()
    token_sums = (-1.2 - 1.8) + 0.4  # summed over each sequence, then over the 2 sequences
    by_width = objective(batch, loss_agg_mode="seq-mean-token-sum-norm")
    assert by_width.loss.item() == pytest.approx(token_sums / 2 / 3)  # T = 3
    by_constant = objective(batch, loss_agg_mode="seq-mean-token-sum-norm", norm_constant=8.0)
    assert by_constant.loss.item() == pytest.approx(token_sums / 2 / 8)


def test_the_named_policy_loss_is_used() -> None:
    batch = tiny_batch()
    # GSPO: one ratio per sequence, exp(mean log-ratio): sqrt(1.5 * 0.9) and 0.5; clip 0.2 bounds them to 1.2, 0.8.
    result = objective(batch, policy_loss="gspo", loss_agg_mode="seq-mean-token-mean", clip_ratio=0.2)
    s = math.sqrt(1.5 * 0.9)
    first = (max(-1.0 * s, -1.0 * min(s, 1.2)) + max(-2.0 * s, -2.0 * min(s, 1.2))) / 2
    second = max(0.5 * 0.5, 0.5 * 0.8)
    assert result.loss.item() == pytest.approx((first + second) / 2)
    with pytest.raises(ValueError, match="unknown policy loss 'ppo2'"):
        objective(batch, policy_loss="ppo2")
