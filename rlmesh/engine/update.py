"""The update loop: epochs of mini-batches, gradients accumulated over micro-batches, metrics reduced over ranks."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rlmesh.data.batch import Batch
from rlmesh.engine.distributed import all_reduce_sum
from rlmesh.engine.forward import micro_batches
from rlmesh.engine.train_engine import TrainEngine


@dataclass
class MicroLoss:
    """What a role's loss function returns for one micro-batch.

    `loss` is already scaled so that summing it over the micro-batches of every rank gives the mini-batch loss
    times the world size (DDP and FSDP2 then average gradients over ranks). `loss_terms` are detached parts of it
    reported as losses; `token_means` are detached per-token averages over this micro-batch's valid tokens.
    """

    loss: Tensor
    loss_terms: dict[str, Tensor]
    token_means: dict[str, Tensor]


def loss_denominator(response_mask: Tensor, loss_agg_mode: str, world_size: int) -> float:
    """Each rank's share of the mini-batch's normaliser, so that accumulated and averaged losses equal the loss of
    the whole global mini-batch: the global count of valid tokens (token-mean) or of non-empty sequences (the
    seq-mean modes), summed over ranks with an all_reduce, divided by the world size."""
    if loss_agg_mode == "token-mean":
        local = (response_mask != 0).sum()
    else:
        local = ((response_mask != 0).sum(dim=-1) > 0).sum()
    total = all_reduce_sum(local.to(torch.float64).reshape(1))
    return float(total.item()) / world_size


def run_mini_batches(
    engine: TrainEngine,
    batch: Batch,
    *,
    mini_batch_size: int,
    micro_batch_size: int,
    token_budget: int | None,
    epochs: int,
    shuffle_generator: torch.Generator | None,
    loss_agg_mode: str,
    micro_loss: Callable[[Batch, float], MicroLoss],
    prefix: str,
    num_mini_batches: int | None = None,
) -> dict[str, float]:
    """`epochs` passes over this rank's shard in mini-batches of `mini_batch_size` rows (shuffled each epoch when a
    generator is given); each mini-batch is one optimizer step over gradients accumulated from its micro-batches.

    Returns the metrics under `prefix`, equal on every rank: each loss term as the mean over mini-batches of the
    global mini-batch loss, each token mean over all valid tokens of every rank, the mean grad norm and the mean
    learning rate of the optimizer steps.

    A batch with more rows than its prompts' samples (multi-turn episodes the chat template split into several)
    does not divide into mini-batches of that size: with `num_mini_batches` (the step's prompts over
    ppo_mini_batch_size, the same on every rank) its rows are spread over that many optimizer steps instead.
    """
    rows = len(batch)
    windows: list[Tensor | slice]
    if num_mini_batches and mini_batch_size >= 1 and rows % mini_batch_size:
        windows = list(torch.arange(rows).tensor_split(num_mini_batches))
    elif mini_batch_size < 1 or rows % mini_batch_size:
        raise ValueError(
            f"this rank got {rows} samples, which do not split into mini-batches of {mini_batch_size} samples "
            f"(ppo_mini_batch_size × rollout.n / dp_size); every rank must take the same number of optimizer steps, "
            "so make the batch a multiple of ppo_mini_batch_size × rollout.n"
        )
    else:
        windows = [slice(start, start + mini_batch_size) for start in range(0, rows, mini_batch_size)]
    engine.module.train()
    loss_sums: dict[str, Tensor] = {}
    token_sums: dict[str, Tensor] = {}
    tokens = torch.zeros((), dtype=torch.float64, device=engine.device)
    grad_norms: list[float] = []
    lrs: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(rows, generator=shuffle_generator) if shuffle_generator is not None else None
        for window in windows:
            mini = batch[order[window] if order is not None else window].to(engine.device)
            denominator = loss_denominator(mini["response_mask"], loss_agg_mode, engine.world_size)
            parts = micro_batches(
                mini,
                micro_batch_size,
                token_budget,
                same_count_on_all_ranks=engine.strategy == "fsdp2",
            )
            for index, micro in enumerate(parts):
                with engine.gradient_sync(index == len(parts) - 1):
                    with engine.autocast():
                        result = micro_loss(micro, denominator)
                    result.loss.backward()
                micro_tokens = (micro["response_mask"] != 0).sum().to(torch.float64)
                tokens += micro_tokens
                for key, value in result.loss_terms.items():
                    loss_sums[key] = loss_sums.get(key, tokens.new_zeros(())) + value.detach().to(torch.float64)
                for key, value in result.token_means.items():
                    weighted = value.detach().to(torch.float64) * micro_tokens
                    token_sums[key] = token_sums.get(key, tokens.new_zeros(())) + weighted
            grad_norm, lr = engine.step()
            grad_norms.append(grad_norm)
            lrs.append(lr)
    # One all_reduce for every metric: [loss sums..., token sums..., token count].
    loss_keys, token_keys = sorted(loss_sums), sorted(token_sums)
    stacked = torch.stack([loss_sums[k] for k in loss_keys] + [token_sums[k] for k in token_keys] + [tokens])
    packed: list[float] = all_reduce_sum(stacked).tolist()
    steps = len(grad_norms)
    metrics = {f"{prefix}/{k}": packed[i] / (engine.world_size * steps) for i, k in enumerate(loss_keys)}
    total_tokens = max(packed[-1], 1.0)
    metrics |= {f"{prefix}/{k}": packed[len(loss_keys) + i] / total_tokens for i, k in enumerate(token_keys)}
    metrics[f"{prefix}/grad_norm"] = sum(grad_norms) / steps
    metrics[f"{prefix}/lr"] = sum(lrs) / steps
    # Optimizer steps skipped for a non-finite gradient norm (TrainEngine.step): the loop stops a run that only skips.
    metrics[f"{prefix}/skipped_steps"] = float(sum(not math.isfinite(norm) for norm in grad_norms))
    metrics[f"{prefix}/optimizer_steps"] = float(steps)
    return metrics


def mean_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """`shard` collect for update endpoints: one metrics dict, each value averaged over the ranks' dicts."""
    keys = per_rank[0].keys()
    return {key: sum(metrics[key] for metrics in per_rank) / len(per_rank) for key in keys}
