"""Token log-probabilities and entropy from logits, stable in low precision and chunked for large vocabularies."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["entropy_from_logits", "entropy_from_logits_chunked", "logprobs_from_logits"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logsumexp over 10^5 logits loses several digits; float32 is the floor, float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def _safe_log_probs(log_probs: Tensor) -> Tensor:
    # A logit of -inf (a banned token) gives p = 0 and log p = -inf, and 0 * -inf is NaN. Any finite stand-in for
    # -inf makes p * log p exactly 0, the correct limit, and keeps the backward pass finite.
    return log_probs.clamp_min(torch.finfo(log_probs.dtype).min)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v with log p = log_softmax(z) (logsumexp-stable), over the last dim; shape [...].

    Working from log p rather than `logsumexp(z) - sum_v p_v z_v` avoids cancelling two large numbers when logits
    are large. Computed in at least float32. Builds full [..., V] temporaries; for long sequences times large
    vocabularies use entropy_from_logits_chunked.
    """
    log_probs = _safe_log_probs(torch.log_softmax(logits.to(_compute_dtype(logits.dtype)), dim=-1))
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _chunk_starts(n_rows: int, chunk_size: int | None) -> range:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")
    return range(0, n_rows, chunk_size or max(n_rows, 1))


class _ChunkedEntropy(torch.autograd.Function):
    """Entropy whose backward recomputes softmax chunk by chunk, so autograd saves only the logits and H.

    dH/dz_v = -p_v (log p_v + H).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, chunk_size: int) -> Tensor:
        rows = _rows(logits)
        entropy = torch.empty(rows.shape[0], dtype=_compute_dtype(logits.dtype), device=logits.device)
        for start in _chunk_starts(rows.shape[0], chunk_size):
            chunk = rows[start : start + chunk_size].to(entropy.dtype)
            log_probs = _safe_log_probs(torch.log_softmax(chunk, dim=-1))
            entropy[start : start + chunk_size] = -(log_probs.exp() * log_probs).sum(dim=-1)
        ctx.save_for_backward(logits, entropy)
        ctx.chunk_size = chunk_size
        return entropy.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx: Any, grad_entropy: Tensor) -> tuple[Tensor, None]:
        logits, entropy = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        rows, grad_rows = _rows(logits), grad_entropy.reshape(-1)
        grad_logits = torch.empty_like(rows)
        for start in _chunk_starts(rows.shape[0], chunk_size):
            window = slice(start, start + chunk_size)
            log_probs = _safe_log_probs(torch.log_softmax(rows[window].to(entropy.dtype), dim=-1))
            grad = -log_probs.exp() * (log_probs + entropy[window, None]) * grad_rows[window, None]
            grad_logits[window] = grad.to(grad_logits.dtype)
        return grad_logits.reshape(logits.shape), None


def entropy_from_logits_chunked(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """entropy_from_logits, `chunk_size` rows of [N, V] at a time, forward and backward.

    Extra memory is O(chunk_size * V) at any moment, in forward and in backward, instead of several [N, V]
    float32 tensors, and autograd keeps only the logits (already alive) and H. Use it when entropy enters the
    loss (entropy_coeff > 0) with a vocabulary of 10^5 over thousands of tokens.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    entropy: Tensor = _ChunkedEntropy.apply(logits, chunk_size)
    return entropy


class _LogprobsFromLogits(torch.autograd.Function):
    """log p(y) = z_y - logsumexp(z), saving only the logits and logsumexp for backward.

    d log p(y) / dz_v = 1[v = y] - p_v, recomputed chunk by chunk.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, chunk_size: int | None) -> Tensor:
        rows, flat_labels = _rows(logits), labels.reshape(-1, 1)
        compute_dtype = _compute_dtype(logits.dtype)
        log_normalizer = torch.empty(rows.shape[0], dtype=compute_dtype, device=logits.device)
        for start in _chunk_starts(rows.shape[0], chunk_size):
            window = slice(start, start + (chunk_size or rows.shape[0]))
            log_normalizer[window] = torch.logsumexp(rows[window].to(compute_dtype), dim=-1)
        label_logits = torch.gather(rows, -1, flat_labels).squeeze(-1).to(compute_dtype)
        ctx.save_for_backward(logits, labels, log_normalizer)
        ctx.chunk_size = chunk_size
        return (label_logits - log_normalizer).reshape(labels.shape)

    @staticmethod
    def backward(ctx: Any, grad_logprobs: Tensor) -> tuple[Tensor, None, None]:
        logits, labels, log_normalizer = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        rows, flat_labels, grad_rows = _rows(logits), labels.reshape(-1, 1), grad_logprobs.reshape(-1, 1)
        grad_logits = torch.empty_like(rows)
        for start in _chunk_starts(rows.shape[0], chunk_size):
            window = slice(start, start + (chunk_size or rows.shape[0]))
            probs = torch.exp(rows[window].to(log_normalizer.dtype) - log_normalizer[window, None])
            grad = (-probs * grad_rows[window]).scatter_add(-1, flat_labels[window], grad_rows[window])
            grad_logits[window] = grad.to(grad_logits.dtype)
        return grad_logits.reshape(logits.shape), None, None


def logprobs_from_logits(logits: Tensor, labels: Tensor, chunk_size: int | None = None) -> Tensor:
    """log p(labels) = z[labels] - logsumexp(z) over the last dim: logits [..., V], labels [...] -> [...].

    Equal to log_softmax(logits).gather(-1, labels) without materialising log_softmax: autograd keeps only the
    logits (already alive) and one logsumexp per row, where the built-in path would save a [..., V] float32
    tensor. Computed in at least float32 (returned in that dtype). `chunk_size` rows at a time bound the float32
    temporaries to chunk_size * V; None processes every row at once.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} need labels of shape {tuple(logits.shape[:-1])}")
    logprobs: Tensor = _LogprobsFromLogits.apply(logits, labels, chunk_size)
    return logprobs
