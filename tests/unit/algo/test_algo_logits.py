"""Tests for rlmesh.algo.logits: entropy and token log-probabilities, plain and chunked, stable at the extremes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmesh.algo import entropy_from_logits, entropy_from_logits_chunked, logprobs_from_logits

FAST = settings(max_examples=30, deadline=None)


def reference_entropy(logits: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=logits.double()).entropy()


def test_entropy_matches_hand_computed_case() -> None:
    # Uniform over 4 tokens: ln 4. Probabilities (1/4, 3/4) from logits (0, ln 3): -(1/4 ln 1/4 + 3/4 ln 3/4).
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -math.inf, -math.inf]])
    expected = torch.tensor([math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    torch.testing.assert_close(entropy_from_logits_chunked(logits, chunk_size=1), expected)


def test_entropy_is_accurate_for_huge_logits_and_finite_with_minus_inf() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=generator) * 1e4 / 3
    logits[:, 0] = logits.max() + 1.0  # nearly one-hot, in float32
    logits[1, 5:] = -math.inf  # banned tokens
    for entropy_fn in (entropy_from_logits, lambda x: entropy_from_logits_chunked(x, chunk_size=2)):
        leaf = logits.clone().requires_grad_()
        entropy = entropy_fn(leaf)
        torch.testing.assert_close(entropy.double(), reference_entropy(logits), atol=1e-6, rtol=1e-4)
        entropy.sum().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_entropy_of_bf16_logits_is_computed_in_float32() -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for entropy in (entropy_from_logits(logits), entropy_from_logits_chunked(logits, chunk_size=3)):
        assert entropy.dtype == torch.float32
        torch.testing.assert_close(entropy.double(), reference_entropy(logits.float()), atol=1e-5, rtol=1e-5)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(1, 3), (5, 7), (2, 3, 11), (4, 1)]),
    chunk_size=st.integers(1, 8),
)
def test_chunked_entropy_matches_plain_entropy_in_value_and_gradient(
    seed: int, shape: tuple[int, ...], chunk_size: int
) -> None:
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    plain_leaf, chunked_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    plain, chunked = entropy_from_logits(plain_leaf), entropy_from_logits_chunked(chunked_leaf, chunk_size)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(plain, reference_entropy(logits))
    weights = torch.randn(plain.shape, dtype=torch.float64)
    (plain * weights).sum().backward()
    (chunked * weights).sum().backward()
    torch.testing.assert_close(chunked_leaf.grad, plain_leaf.grad)


def test_chunked_entropy_passes_gradcheck() -> None:
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits_chunked(x, chunk_size=2), (logits,))


def test_logprobs_match_hand_computed_case() -> None:
    logits = torch.tensor([[0.0, math.log(3)], [1.0, 1.0]])
    labels = torch.tensor([1, 0])
    torch.testing.assert_close(logprobs_from_logits(logits, labels), torch.tensor([math.log(0.75), math.log(0.5)]))


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(1, 3), (5, 7), (2, 3, 11), (4, 1)]),
    chunk_size=st.one_of(st.none(), st.integers(1, 8)),
)
def test_logprobs_equal_gathered_log_softmax_in_value_and_gradient(
    seed: int, shape: tuple[int, ...], chunk_size: int | None
) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    ours_leaf, reference_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = logprobs_from_logits(ours_leaf, labels, chunk_size=chunk_size)
    reference = torch.log_softmax(reference_leaf, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours, reference)
    weights = torch.randn(ours.shape, dtype=torch.float64)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(ours_leaf.grad, reference_leaf.grad)


def test_logprobs_pass_gradcheck() -> None:
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 5, 2, 2, 1])
    assert torch.autograd.gradcheck(lambda x: logprobs_from_logits(x, labels, chunk_size=2), (logits,))


def test_logprobs_of_bf16_logits_are_accurate_and_the_gradient_keeps_the_dtype() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = (torch.randn(6, 32000, generator=generator) * 4).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 32000, (6,), generator=generator)
    logprobs = logprobs_from_logits(logits, labels, chunk_size=4)
    assert logprobs.dtype == torch.float32
    reference = torch.log_softmax(logits.detach().double(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs.double(), reference, atol=1e-5, rtol=1e-5)
    logprobs.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_logprobs_argument_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\) need labels of shape \(2, 3\)"):
        logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size must be a positive number of rows"):
        logprobs_from_logits(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive number of rows"):
        entropy_from_logits_chunked(torch.zeros(2, 5), chunk_size=0)
