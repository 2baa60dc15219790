"""Forwards over the response tokens of a batch: log-probs, entropy and values, in micro-batches, padded or packed."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rlmesh.algo import entropy_from_logits_chunked, logprobs_from_logits
from rlmesh.data.batch import Batch, BatchParts, balanced_partition, first_fit_bins
from rlmesh.engine.distributed import all_reduce_max

# Rows of [tokens, vocab] logits per chunk when computing entropy: 1024 × 152k (Qwen2.5) float32 is 0.6 GB.
ENTROPY_CHUNK_ROWS = 1024
# The batch fields a response forward reads (input_ids = prompt ++ response).
SCORE_FIELDS = ["input_ids", "attention_mask", "position_ids", "response_mask"]


def response_width(batch: Batch) -> int:
    """T, the width of the per-token response fields; the last T columns of input_ids are the response."""
    return int(batch["response_mask"].shape[1])


def _response_forward(model: nn.Module, batch: Batch, packed: bool = False) -> tuple[Tensor, Tensor, int]:
    """The model's outputs at the positions that predict the response tokens, and those tokens.

    With P = prompt width and T = response width (prompt left-padded, response right-padded, verl's layout), the
    output at position P-1+t sees the prompt and response tokens < t and scores response token t. Columns that are
    padding in every row (the left of the prompt, the right of the response) are cut before the forward: positions
    come from position_ids and padding is masked, so the result is the same, for less work. Returns
    (outputs [B, R, ...], response token ids [B, R], R) where R <= T is the widest real response (at least 1).
    With `packed`, the model sees only the real tokens (packed_forward); the outputs are the same.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    total_width, width = input_ids.shape[1], response_width(batch)
    prompt_width = total_width - width
    if prompt_width < 1:
        raise ValueError(
            f"input_ids has {total_width} columns and response_mask {width}: no prompt column is left to predict "
            "the first response token; input_ids must be prompt ++ response"
        )
    # The first column where some row has a real prompt token (argmax finds the first 1), and one past the last
    # column where some row has a real response token.
    start = int(attention_mask[:, :prompt_width].any(dim=0).to(torch.int8).argmax())
    used_response = attention_mask[:, prompt_width:].any(dim=0).nonzero()
    used_width = max(int(used_response.max()) + 1 if used_response.numel() else 0, 1)
    stop = prompt_width + used_width
    window = (input_ids[:, start:stop], attention_mask[:, start:stop], batch["position_ids"][:, start:stop])
    if packed:
        outputs = packed_forward(model, *window)
    else:
        outputs = model(input_ids=window[0], attention_mask=window[1], position_ids=window[2], use_cache=False).logits
    first = prompt_width - 1 - start
    return outputs[:, first : first + used_width], input_ids[:, prompt_width:stop], used_width


def packed_forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    """The model's outputs [B, L, ...] for padded rows, computed on their real tokens only (0 at padding).

    Each row's real tokens (attention_mask) go into rows of the longest sequence's width, several sequences per row
    (first-fit decreasing), with their own position_ids, which restart at each sequence, and no attention mask:
    transformers then reads the restarts as sequence boundaries and attends within each sequence only (a block
    causal mask for SDPA and eager, variable-length kernels for flash-attention). The matmuls run on the real tokens
    plus each packed row's tail, not on the padding of the longest row.
    """
    real = attention_mask != 0
    host_lengths = real.sum(dim=1).cpu()  # one device-to-host copy: the bins are planned on the host
    capacity = max(int(host_lengths.max()), 1)
    bins = first_fit_bins(host_lengths.tolist(), capacity)
    # Where each row starts in the packed layout: its bin, and the lengths of the rows before it in that bin.
    bin_of = torch.empty(len(host_lengths), dtype=torch.long)
    offset_of = torch.empty(len(host_lengths), dtype=torch.long)
    for number, members in enumerate(bins):
        bin_of[members] = number
        offset_of[members] = torch.cumsum(host_lengths[members], dim=0) - host_lengths[members]
    rows, columns = real.nonzero(as_tuple=True)
    rank_in_row = (torch.cumsum(real, dim=1) - 1)[rows, columns]
    device = input_ids.device
    target_bin = bin_of.to(device)[rows]
    target_slot = offset_of.to(device)[rows] + rank_in_row
    packed_ids = input_ids.new_zeros(len(bins), capacity)
    packed_ids[target_bin, target_slot] = input_ids[rows, columns]
    # A bin's unused tail counts 0, 1, 2...: a sequence of its own, attending to nothing real.
    packed_positions = torch.arange(capacity, device=device).repeat(len(bins), 1)
    packed_positions[target_bin, target_slot] = position_ids[rows, columns]
    outputs = model(input_ids=packed_ids, position_ids=packed_positions, attention_mask=None, use_cache=False).logits
    unpacked = outputs.new_zeros(*input_ids.shape, *outputs.shape[2:])
    return unpacked.index_put((rows, columns), outputs[target_bin, target_slot])


def _pad_to(values: Tensor, width: int) -> Tensor:
    # F.pad keeps the gradient; the padded columns hold 0.
    return nn.functional.pad(values, (0, width - values.shape[-1]))


def response_logprobs(
    model: nn.Module, batch: Batch, temperature: float = 1.0, with_entropy: bool = False, packed: bool = False
) -> tuple[Tensor, Tensor | None]:
    """log pi(response token t | prompt, tokens < t) [B, T] float32 and, if asked, the entropy there [B, T].

    Logits are divided by `temperature` first, as the rollout engine does when it samples, so these log-probs are
    comparable with the rollout's. Differentiable when grad is enabled. Needs input_ids, attention_mask,
    position_ids and response_mask; values at masked positions are not meaningful. `packed` runs the model on the
    real tokens only (packed_forward), for the same result.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score tokens, got {temperature}; greedy batches score at 1.0")
    width = response_width(batch)
    logits, response_ids, _ = _response_forward(model, batch, packed)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = _pad_to(logprobs_from_logits(logits, response_ids), width)
    if not with_entropy:
        return logprobs, None
    entropy = entropy_from_logits_chunked(logits, chunk_size=ENTROPY_CHUNK_ROWS)
    return logprobs, _pad_to(entropy, width)


def response_values(model: nn.Module, batch: Batch, packed: bool = False) -> Tensor:
    """A value model's V(state before response token t) [B, T] float32: its output at the same positions as the
    logits that score token t (verl's alignment: values[:, -T-1:-1]); `packed` as in response_logprobs."""
    values, _, _ = _response_forward(model, batch, packed)
    return _pad_to(values[..., 0].float(), response_width(batch))


def micro_batches(
    batch: Batch, size: int, token_budget: int | None = None, *, same_count_on_all_ranks: bool = False
) -> BatchParts:
    """Split a batch into micro-batches of at most `size` rows or, with `token_budget`, at most that many tokens.

    By tokens: the fewest parts whose token sums (attention_mask) fit the budget, rows balanced across parts by
    balanced_partition; each part keeps its rows in order and `parts.gather(results)` restores the batch's order.
    `same_count_on_all_ranks` takes the largest count over the data-parallel ranks (FSDP2 gathers parameters in
    every forward, so all ranks must run the same number); the budget is then a target the parts meet or beat.
    """
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1 sample, got {size}")
    if len(batch) == 0:
        raise ValueError("cannot split an empty batch into micro-batches")
    if token_budget is None:
        count = math.ceil(len(batch) / size)
        if same_count_on_all_ranks:
            count = min(all_reduce_max(count), len(batch))
        return batch.split(count)
    lengths = batch.sequence_lengths().tolist()
    longest = max(lengths)
    if longest > token_budget:
        raise ValueError(
            f"a sequence of {longest} tokens does not fit the micro-batch token budget of {token_budget}; raise "
            f"ppo_max_token_len_per_device to at least {longest} (prompt + response length)"
        )
    count = max(1, math.ceil(sum(lengths) / token_budget))
    groups = balanced_partition(lengths, count)
    while max(sum(lengths[i] for i in group) for group in groups) > token_budget:
        count += 1
        groups = balanced_partition(lengths, count)
    if same_count_on_all_ranks:
        synced = min(all_reduce_max(count), len(batch))
        if synced != count:
            count, groups = synced, balanced_partition(lengths, synced)
    indices = [torch.tensor(group, dtype=torch.long) for group in groups]
    parts = [batch[index] for index in indices]
    return BatchParts(parts, indices, [sum(lengths[i] for i in group) for group in groups])


def require_fields(batch: Batch, fields: list[str], endpoint: str) -> None:
    """Raise a KeyError naming every field `endpoint` needs that the batch lacks."""
    missing = [field for field in fields if field not in batch]
    if missing:
        raise KeyError(f"{endpoint} needs batch fields {missing}, which are missing; the batch has {batch.keys()}")
