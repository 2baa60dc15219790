"""Masked reductions (sum, mean, variance, whitening) over the valid tokens of a padded batch."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_mean", "masked_sum", "masked_var", "masked_whiten"]


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """sum_i m_i * x_i over `dim` (all elements when None).

    The mask may be bool, 0/1 or non-negative weights. Positions where m_i == 0 contribute exactly 0 even when
    x_i is NaN or inf, so whatever a padded position holds can never leak into a result.
    """
    weighted = torch.where(mask != 0, values * mask.to(values.dtype), 0.0)
    if dim is None:
        return weighted.sum()
    return weighted.sum(dim=dim, keepdim=keepdim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """sum_i m_i x_i / sum_i m_i over `dim`; 0 (not NaN) where the mask is empty.

    An empty slice returns 0 so that a fully padded row cannot turn a metric or a loss into NaN.
    """
    count = masked_sum(torch.ones_like(values), mask, dim=dim, keepdim=keepdim)
    # A tiny floor instead of a branch keeps this differentiable; the numerator is exactly 0 when count is.
    return masked_sum(values, mask, dim=dim, keepdim=keepdim) / count.clamp_min(torch.finfo(values.dtype).tiny)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the valid elements: sum_i m_i (x_i - mu)^2 / N, times N / (N - 1) when unbiased (Bessel).

    N = sum_i m_i. Raises ValueError when unbiased and N < 2, where Bessel's correction is undefined, rather than
    returning inf or NaN that would silently poison whitened advantages.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if not unbiased:
        return variance
    count = masked_sum(torch.ones_like(values), mask)
    if count < 2:
        raise ValueError(
            f"masked_var(unbiased=True) needs at least 2 valid elements, got {count.item():g}; "
            "pass unbiased=False or a mask with more valid elements"
        )
    return variance * count / (count - 1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mu) / sqrt(var + eps) over the valid elements, with mu and unbiased var taken over the mask.

    With shift_mean=False the mean is added back: x' = (x - mu) / sqrt(var + eps) + mu, which rescales without
    centring. Masked positions are 0 in the output. Needs at least 2 valid elements (see masked_var).
    """
    mean = masked_mean(values, mask)
    variance = masked_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, 0.0)
