"""Tests for rlmesh.algo.advantages: one hand-computed case per estimator, registry errors, and invariants.

Invariants: group baselines centre each group, padding (garbage in masked positions, extra masked columns anywhere,
extra padded rows) never changes a result, groups of one stay finite, outputs are 0 on masked positions.
"""

import math
from collections.abc import Hashable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from rlmesh.algo import (
    ADVANTAGE_ESTIMATORS,
    discounted_returns,
    get_advantage_estimator,
    register_advantage,
)

FAST = settings(max_examples=50, deadline=None)
GROUPED = ["grpo", "rloo", "reinforce_plus_plus_baseline", "opo"]


def whiten_reference(x: torch.Tensor) -> torch.Tensor:
    """Whitening of a flat tensor of valid values, written with torch.std to check masked_whiten independently."""
    return (x - x.mean()) / torch.sqrt(x.var() + 1e-8)


def rows(*values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------------- hand-computed cases


def test_gae_matches_hand_computed_case() -> None:
    rewards = rows([0.0, 0.0, 1.0], [0.0, 2.0, 0.0])
    values = rows([0.5, 0.5, 0.5], [1.0, 1.0, 99.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # gamma 1, lam 0.5.  Row 0: delta = [0, 0, 0.5]; A_2 = 0.5, A_1 = 0 + 0.5 * 0.5 = 0.25, A_0 = 0.125.
    # Row 1 (2 tokens): delta_1 = 2 - 1 = 1, A_1 = 1; delta_0 = 0 + 1 - 1 = 0, A_0 = 0.5.
    advantages, returns = get_advantage_estimator("gae")(rewards, mask, values=values, gamma=1.0, lam=0.5)
    raw = torch.tensor([0.125, 0.25, 0.5, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(returns, rows([0.625, 0.75, 1.0], [1.5, 2.0, 0.0]))
    torch.testing.assert_close(advantages[mask.bool()], whiten_reference(raw))
    assert advantages[1, 2].item() == 0.0


def test_gae_discounts_with_gamma_and_lambda() -> None:
    rewards, values, mask = rows([0.0, 1.0], [0.0, 0.0]), rows([0.2, 0.4], [0.0, 0.0]), torch.ones(2, 2)
    # gamma 0.9, lam 0.8. Row 0: delta_1 = 1 - 0.4 = 0.6 = A_1; delta_0 = 0.9 * 0.4 - 0.2 = 0.16,
    # A_0 = 0.16 + 0.72 * 0.6 = 0.592. Returns = A + V.
    _, returns = get_advantage_estimator("gae")(rewards, mask, values=values, gamma=0.9, lam=0.8)
    torch.testing.assert_close(returns, rows([0.792, 1.0], [0.0, 0.0]))


def test_gae_skips_masked_tokens_in_the_middle() -> None:
    # A masked observation token between two valid tokens acts as if it were not there.
    rewards, values = rows([0.0, math.nan, 1.0]), rows([0.5, math.nan, 0.25])
    estimator = get_advantage_estimator("gae")
    _, with_gap = estimator(rewards, torch.tensor([[1, 0, 1]]), values=values, gamma=0.9, lam=0.8)
    _, compact = estimator(rows([0.0, 1.0]), torch.ones(1, 2), values=rows([0.5, 0.25]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(with_gap[:, [0, 2]], compact)
    assert with_gap[0, 1].item() == 0.0


def test_grpo_matches_hand_computed_case() -> None:
    rewards = rows([0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0], [1.0, 3.0])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0], [1, 1]])
    # Group a: scores 1, 0, 0; mean 1/3, unbiased std sqrt(1/3). Group b: scores 2, 4; mean 3, std sqrt(2).
    advantages, returns = get_advantage_estimator("grpo")(rewards, mask, group_ids=["a", "a", "a", "b", "b"], eps=0.0)
    third = 1 / math.sqrt(3)
    expected = torch.tensor([2 / 3 / third, -1 / 3 / third, -1 / 3 / third, -1 / math.sqrt(2), 1 / math.sqrt(2)])
    torch.testing.assert_close(advantages, expected.double()[:, None] * mask)
    torch.testing.assert_close(returns, advantages)


def test_dr_grpo_centres_without_dividing_by_std() -> None:
    rewards = rows([1.0], [0.0], [0.0], [2.0], [4.0])
    advantages, _ = get_advantage_estimator("grpo")(
        rewards, torch.ones(5, 1), group_ids=["a", "a", "a", "b", "b"], norm_adv_by_std=False
    )
    torch.testing.assert_close(advantages[:, 0], torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, 1.0]).double())


def test_grpo_eps_is_added_to_the_std() -> None:
    advantages, _ = get_advantage_estimator("grpo")(rows([0.0], [2.0]), torch.ones(2, 1), group_ids=[0, 0], eps=0.5)
    # mean 1, unbiased std sqrt(2)
    torch.testing.assert_close(advantages[:, 0], torch.tensor([-1.0, 1.0]).double() / (math.sqrt(2) + 0.5))


def test_grpo_gives_zero_to_a_group_of_one_and_to_a_group_of_equal_scores() -> None:
    rewards = rows([5.0], [1.0], [1.0], [1.0])
    advantages, _ = get_advantage_estimator("grpo")(rewards, torch.ones(4, 1), group_ids=["solo", "b", "b", "b"])
    assert torch.equal(advantages, torch.zeros_like(advantages))


def test_rloo_matches_hand_computed_case() -> None:
    rewards = rows([1.0], [0.0], [0.0], [2.0], [4.0], [7.0])
    advantages, returns = get_advantage_estimator("rloo")(
        rewards, torch.ones(6, 1), group_ids=["a", "a", "a", "b", "b", "solo"]
    )
    # Group a: 1 - (0 + 0) / 2 = 1, 0 - (1 + 0) / 2 = -0.5 twice. Group b: 2 - 4, 4 - 2. A group of one: 0.
    torch.testing.assert_close(advantages[:, 0], torch.tensor([1.0, -0.5, -0.5, -2.0, 2.0, 0.0]).double())
    torch.testing.assert_close(returns, advantages)


def test_discounted_returns_match_hand_computed_case() -> None:
    rewards = rows([1.0, 0.0, 2.0], [3.0, math.nan, 4.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    # Row 0, gamma 0.5: G_2 = 2, G_1 = 0 + 1 = 1, G_0 = 1 + 0.5 = 1.5.
    # Row 1 skips its masked middle token: G_2 = 4, G_0 = 3 + 0.5 * 4 = 5.
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma=0.5), rows([1.5, 1.0, 2.0], [5.0, 0.0, 4.0]))


def test_reinforce_plus_plus_matches_hand_computed_case() -> None:
    rewards = rows([0.0, 0.0, 1.0], [1.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = get_advantage_estimator("reinforce_plus_plus")(rewards, mask, gamma=0.5)
    # Row 0: G = [0.25, 0.5, 1]; row 1: G = [1, 0].
    torch.testing.assert_close(returns, rows([0.25, 0.5, 1.0], [1.0, 0.0, 0.0]))
    raw = torch.tensor([0.25, 0.5, 1.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(advantages[mask.bool()], whiten_reference(raw))


def test_reinforce_plus_plus_baseline_matches_hand_computed_case() -> None:
    rewards = rows([0.0, 1.0], [0.0, 0.0], [3.0, 0.0], [2.0, 0.0])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]])
    advantages, returns = get_advantage_estimator("reinforce_plus_plus_baseline")(
        rewards, mask, group_ids=["a", "a", "b", "b"]
    )
    # Group means 0.5 and 2.5, so per-row values 0.5, -0.5, 0.5, -0.5 on each valid token, then batch whitening
    # over the 6 valid tokens: [0.5, 0.5, -0.5, -0.5, 0.5, -0.5].
    raw = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.5, -0.5], dtype=torch.float64)
    torch.testing.assert_close(advantages[mask.bool()], whiten_reference(raw))
    torch.testing.assert_close(returns, advantages)


def test_remax_matches_hand_computed_case() -> None:
    rewards = rows([0.0, 1.0], [2.0, 0.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    greedy = torch.tensor([0.25, 3.0])
    advantages, returns = get_advantage_estimator("remax")(rewards, mask, baseline_rewards=greedy)
    # Reward-to-go (gamma 1) minus the greedy response's reward, on valid tokens.
    torch.testing.assert_close(returns, rows([1.0, 1.0], [2.0, 0.0]))
    torch.testing.assert_close(advantages, rows([0.75, 0.75], [-1.0, 0.0]))
    # With gamma 0.5 the reward-to-go of row 0's first token is 0 + 0.5 * 1.
    advantages, returns = get_advantage_estimator("remax")(rewards, mask, baseline_rewards=greedy, gamma=0.5)
    torch.testing.assert_close(returns, rows([0.5, 1.0], [2.0, 0.0]))
    torch.testing.assert_close(advantages, rows([0.25, 0.75], [-1.0, 0.0]))


def test_opo_matches_hand_computed_case() -> None:
    rewards = rows([0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [9.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    advantages, returns = get_advantage_estimator("opo")(rewards, mask, group_ids=["a", "a", "b", "b", "solo"])
    # Group a: lengths 3, 2, scores 1, 0: b = (3 * 1 + 2 * 0) / 5 = 0.6. Group b: lengths 2, 1, scores 2, 0:
    # b = 4 / 3. A group of one: b = its own score, so 0.
    expected = torch.tensor([0.4, -0.6, 2 / 3, -4 / 3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected[:, None] * mask)
    torch.testing.assert_close(returns, advantages)


# ------------------------------------------------------------------------------------------------ registry


def test_registry_holds_every_estimator_of_issue_3() -> None:
    expected = {"gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax", "opo"}
    assert expected <= set(ADVANTAGE_ESTIMATORS)


def test_unknown_estimator_error_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'grpoo'; known: \[.*'grpo'.*'rloo'"):
        get_advantage_estimator("grpoo")


def test_register_advantage_adds_a_custom_estimator_and_refuses_a_taken_name() -> None:
    @register_advantage("test_zero_advantage")
    def zero(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, **_: object) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(token_level_rewards), torch.zeros_like(token_level_rewards)

    try:
        assert get_advantage_estimator("test_zero_advantage") is zero
        with pytest.raises(ValueError, match="already registered"):
            register_advantage("grpo")(zero)
    finally:
        del ADVANTAGE_ESTIMATORS["test_zero_advantage"]


@pytest.mark.parametrize("name", GROUPED)
def test_group_estimators_without_group_ids_say_what_is_missing(name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}' needs group_ids"):
        get_advantage_estimator(name)(torch.ones(2, 2), torch.ones(2, 2))


def test_gae_without_values_and_remax_without_baseline_say_what_is_missing() -> None:
    with pytest.raises(ValueError, match="'gae' needs values"):
        get_advantage_estimator("gae")(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="'remax' needs baseline_rewards"):
        get_advantage_estimator("remax")(torch.ones(2, 2), torch.ones(2, 2))


def test_group_ids_of_the_wrong_length_are_an_error() -> None:
    with pytest.raises(ValueError, match="group_ids has 3 entries but the batch has 2 rows"):
        get_advantage_estimator("grpo")(torch.ones(2, 2), torch.ones(2, 2), group_ids=[0, 0, 1])


def test_group_ids_may_be_strings_ints_tuples_or_a_tensor() -> None:
    rewards, mask = rows([1.0], [0.0], [5.0], [3.0]), torch.ones(4, 1)
    estimator = get_advantage_estimator("grpo")
    reference, _ = estimator(rewards, mask, group_ids=["p0", "p0", "p1", "p1"])
    ids: list[list[Hashable] | torch.Tensor] = [[7, 7, 3, 3], [(0, "x"), (0, "x"), (1, "x"), (1, "x")]]
    for group_ids in [*ids, torch.tensor([4, 4, 9, 9])]:
        torch.testing.assert_close(estimator(rewards, mask, group_ids=group_ids)[0], reference)


def test_advantages_carry_no_gradient() -> None:
    values = torch.zeros(2, 2, requires_grad=True)
    advantages, returns = get_advantage_estimator("gae")(torch.ones(2, 2), torch.ones(2, 2), values=values)
    assert not advantages.requires_grad and not returns.requires_grad


# ----------------------------------------------------------------------------------------------- properties


@dataclass
class Batch:
    rewards: torch.Tensor
    mask: torch.Tensor
    group_ids: list[Hashable]
    values: torch.Tensor
    baseline_rewards: torch.Tensor


def random_batch(seed: int, n_groups: int, group_size: int, length: int, all_rows_valid: bool = False) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    batch_size = n_groups * group_size
    length = max(length, 2) if batch_size == 1 else length  # whitening needs two valid tokens
    rewards = torch.randn(batch_size, length, generator=generator, dtype=torch.float64)
    mask = torch.rand(batch_size, length, generator=generator) < 0.7
    mask[0, 0] = mask[-1, -1] = True
    if all_rows_valid:
        mask[:, 0] = True
    order = torch.randperm(batch_size, generator=generator).tolist()
    return Batch(
        rewards=rewards,
        mask=mask,
        group_ids=[f"uid{order[i] % n_groups}" for i in range(batch_size)],
        values=torch.randn(batch_size, length, generator=generator, dtype=torch.float64),
        baseline_rewards=torch.randn(batch_size, generator=generator, dtype=torch.float64),
    )


def run(name: str, batch: Batch, norm_adv_by_std: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    return get_advantage_estimator(name)(
        batch.rewards,
        batch.mask,
        group_ids=batch.group_ids,
        values=batch.values,
        baseline_rewards=batch.baseline_rewards,
        gamma=0.9,
        lam=0.8,
        norm_adv_by_std=norm_adv_by_std,
    )


shapes = {
    "seed": st.integers(0, 2**31 - 1),
    "n_groups": st.integers(1, 4),
    "group_size": st.integers(1, 4),
    "length": st.integers(1, 6),
}


@FAST
@given(**shapes)
def test_group_baselines_centre_every_group(seed: int, n_groups: int, group_size: int, length: int) -> None:
    batch = random_batch(seed, n_groups, group_size, length, all_rows_valid=True)
    lengths = batch.mask.sum(-1).double()
    per_row = {
        "grpo": run("grpo", batch)[0][:, 0],
        "dr_grpo": run("grpo", batch, norm_adv_by_std=False)[0][:, 0],
        "rloo": run("rloo", batch)[0][:, 0],
        "opo": run("opo", batch)[0][:, 0] * lengths,  # OPO centres the length-weighted scores
    }
    for uid in set(batch.group_ids):
        members = torch.tensor([g == uid for g in batch.group_ids])
        for name, advantage in per_row.items():
            assert advantage[members].sum().item() == pytest.approx(0.0, abs=1e-9), name


@FAST
@given(**shapes, inserted=st.lists(st.integers(0, 6), min_size=1, max_size=3), garbage=st.sampled_from([math.nan, 1e9]))
def test_padding_never_changes_any_estimator(
    seed: int, n_groups: int, group_size: int, length: int, inserted: list[int], garbage: float
) -> None:
    batch = random_batch(seed, n_groups, group_size, length)
    mask = batch.mask
    # Garbage on every masked position, fully masked columns inserted anywhere, and a padded row in its own group.
    columns = list(range(mask.shape[1]))
    for position in inserted:
        columns.insert(min(position, len(columns)), -1)
    keep = torch.tensor([c >= 0 for c in columns])

    def widen(tensor: torch.Tensor) -> torch.Tensor:
        wide = torch.full((tensor.shape[0] + 1, len(columns)), garbage, dtype=tensor.dtype)
        wide[:-1, keep] = torch.where(mask, tensor, garbage)
        return wide

    padded_mask = torch.zeros(mask.shape[0] + 1, len(columns), dtype=torch.bool)
    padded_mask[:-1, keep] = mask
    padded = Batch(
        rewards=widen(batch.rewards),
        mask=padded_mask,
        group_ids=[*batch.group_ids, "padding-row"],
        values=widen(batch.values),
        baseline_rewards=torch.cat([batch.baseline_rewards, torch.tensor([garbage], dtype=torch.float64)]),
    )
    for name in ADVANTAGE_ESTIMATORS:
        for original, with_padding in zip(run(name, batch), run(name, padded), strict=True):
            torch.testing.assert_close(with_padding[:-1, keep], original, msg=name)
            assert (with_padding[-1] == 0).all() and (with_padding[:, ~keep] == 0).all(), name
            assert (original[~mask] == 0).all(), name


@FAST
@given(seed=st.integers(0, 2**31 - 1), batch_size=st.integers(2, 6), length=st.integers(1, 5))
def test_groups_of_one_give_finite_advantages(seed: int, batch_size: int, length: int) -> None:
    batch = random_batch(seed, batch_size, 1, length)
    batch.group_ids = list(range(batch_size))
    for name in ADVANTAGE_ESTIMATORS:
        advantages, returns = run(name, batch)
        assert torch.isfinite(advantages).all() and torch.isfinite(returns).all(), name
        if name in GROUPED:
            torch.testing.assert_close(advantages, torch.zeros_like(advantages), msg=name)


@FAST
@given(**shapes)
def test_gae_and_reinforce_plus_plus_whiten_over_every_valid_token_of_the_batch(
    seed: int, n_groups: int, group_size: int, length: int
) -> None:
    batch = random_batch(seed, n_groups, group_size, length)
    for name in ("gae", "reinforce_plus_plus"):
        advantages, returns = run(name, batch)
        raw = (returns - batch.values if name == "gae" else returns)[batch.mask]  # gae: returns = A + V
        valid = advantages[batch.mask]
        torch.testing.assert_close(valid, (raw - raw.mean()) / torch.sqrt(raw.var() + 1e-8), msg=name)
