"""Batch: one rollout batch (tensors in a TensorDict, per-sample objects in lists) and its split/concat/pad ops."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast, overload

import numpy as np
import torch
from tensordict import TensorDict

from rlmesh.wire import tensor_from_wire, tensor_to_wire

# Field names the roles and the loop agree on. Any of them may be absent, and other names may be added.
TOKEN_KEYS = ("prompt_ids", "response_ids", "input_ids", "attention_mask", "position_ids", "response_mask")
# Per-token tensors are aligned with response_ids: shape [batch, response_length].
PER_TOKEN_KEYS = (
    "response_mask",
    "rollout_logprobs",
    "old_logprobs",
    "ref_logprobs",
    "values",
    "token_level_scores",
    "token_level_rewards",
    "advantages",
    "returns",
)
NON_TENSOR_KEYS = ("data_source", "ground_truth", "uid", "extra_info", "weight_version")

RowIndex = int | slice | Sequence[int] | Sequence[bool] | torch.Tensor | np.ndarray


class Batch:
    """A batch of samples: per-sample tensors, per-sample Python objects and a small batch-level `meta` dict.

    - `tensors` is a `TensorDict` with `batch_size=[len(batch)]`: every tensor's first dimension is the sample.
    - `non_tensors` maps a name to a list with one object per sample (data_source, ground_truth, uid, ...).
    - `meta` holds batch-level values (temperature, global step, metrics); it is carried along, never indexed.

    `batch["key"]` reads a field and `batch["key"] = value` adds or replaces one; `batch[rows]` with an int, slice,
    list of ints, bool mask or LongTensor returns a new Batch with those rows in that order (an int keeps a batch of
    one). Row selection by slice gives views of the tensors, as torch slicing does; other indexing copies.

    Pickling (and so `ray.put`) sends each tensor as one flat numpy buffer, which Ray moves out of band: a Batch
    crosses the object store with a single copy into the store and none out of it. Tensors arrive on CPU and, when
    read from the object store, share its memory: write to them in place only after `clone()`.
    """

    __slots__ = ("meta", "non_tensors", "tensors")

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | TensorDict | None = None,
        non_tensors: Mapping[str, Sequence[Any]] | None = None,
        meta: Mapping[str, Any] | None = None,
        *,
        size: int | None = None,
    ) -> None:
        tensor_fields = cast(dict[str, torch.Tensor], dict(tensors.items()) if tensors is not None else {})
        object_fields = {key: _as_object_list(key, values) for key, values in (non_tensors or {}).items()}
        both = sorted(set(tensor_fields) & set(object_fields))
        if both:
            raise ValueError(f"Batch fields {both} were given both as tensors and as non-tensors; give each once")
        row_counts: dict[str, int] = {}
        for key, tensor in tensor_fields.items():
            if not isinstance(tensor, torch.Tensor) or tensor.ndim == 0:
                raise ValueError(
                    f"Batch tensor field {key!r} must be a tensor with a leading sample dimension, got "
                    f"{_describe(tensor)}; put batch-level values in meta"
                )
            row_counts[key] = tensor.shape[0]
        row_counts.update({key: len(values) for key, values in object_fields.items()})
        if size is None:
            size = next(iter(row_counts.values()), 0)
        disagreeing = {key: count for key, count in row_counts.items() if count != size}
        if disagreeing:
            raise ValueError(
                f"Batch fields disagree on the number of samples (expected {size}): {row_counts}; every tensor's "
                f"first dimension and every per-sample list must have one entry per sample"
            )
        self.tensors = TensorDict(tensor_fields, batch_size=[size])
        self.non_tensors = object_fields
        self.meta: dict[str, Any] = dict(meta or {})
        for key in PER_TOKEN_KEYS:
            if key in tensor_fields:
                self._check_response_width(key, tensor_fields[key])

    @classmethod
    def _from_parts(cls, tensors: TensorDict, non_tensors: dict[str, list[Any]], meta: dict[str, Any]) -> Batch:
        """Build without validation, for operations whose inputs are already consistent."""
        batch = cls.__new__(cls)
        batch.tensors = tensors
        batch.non_tensors = non_tensors
        batch.meta = meta
        return batch

    # ----------------------------------------------------------------------------------------------- fields

    def __len__(self) -> int:
        return int(self.tensors.batch_size[0])

    def keys(self) -> list[str]:
        """Names of all per-sample fields, tensors first."""
        return self._tensor_keys() + list(self.non_tensors)

    def _tensor_keys(self) -> list[str]:
        # .keys() is needed: iterating a TensorDict yields its rows, not its keys.
        return [str(key) for key in self.tensors.keys()]  # noqa: SIM118

    def __iter__(self) -> Iterator[Any]:
        # Without this, Python would iterate rows through __getitem__, while users of dict-like containers expect keys.
        raise TypeError("a Batch is not iterable; loop over batch.keys() for fields, or range(len(batch)) for rows")

    def __contains__(self, key: object) -> bool:
        return key in self.non_tensors or (isinstance(key, str) and key in self.tensors)

    @overload
    def __getitem__(self, key: str) -> Any: ...

    @overload
    def __getitem__(self, key: RowIndex) -> Batch: ...

    def __getitem__(self, key: str | RowIndex) -> Any:
        if isinstance(key, str):
            if key in self.non_tensors:
                return self.non_tensors[key]
            if key in self.tensors:
                return self.tensors[key]
            raise KeyError(f"Batch has no field {key!r}; its fields are {self.keys()}")
        return self._select_rows(key)

    def get(self, key: str, default: Any = None) -> Any:
        """The field `key`, or `default` when the Batch lacks it."""
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"Batch fields are set by name (a str), got {key!r}; to change rows, build a new Batch")
        if isinstance(value, np.ndarray) and value.dtype != object:
            value = torch.from_numpy(value)
        if isinstance(value, torch.Tensor):
            if value.ndim == 0 or value.shape[0] != len(self):
                raise ValueError(
                    f"Batch field {key!r} needs a leading dimension of {len(self)} (one row per sample), got shape "
                    f"{tuple(value.shape)}; put batch-level values in batch.meta"
                )
            if key in PER_TOKEN_KEYS:
                self._check_response_width(key, value)
            self.non_tensors.pop(key, None)
            self.tensors[key] = value
            return
        values = _as_object_list(key, value)
        if len(values) != len(self):
            raise ValueError(f"Batch field {key!r} needs {len(self)} values (one per sample), got {len(values)}")
        if key in self.tensors:
            del self.tensors[key]
        self.non_tensors[key] = values

    def __delitem__(self, key: str) -> None:
        if key in self.non_tensors:
            del self.non_tensors[key]
        elif key in self.tensors:
            del self.tensors[key]
        else:
            raise KeyError(f"Batch has no field {key!r}; its fields are {self.keys()}")

    def _check_response_width(self, key: str, value: torch.Tensor) -> None:
        if "response_ids" not in self.tensors or key == "response_ids":
            return
        width = self.tensors["response_ids"].shape[1]
        if value.ndim < 2 or value.shape[1] != width:
            raise ValueError(
                f"Batch field {key!r} is per-token and must be aligned with response_ids (shape [{len(self)}, "
                f"{width}]), got shape {tuple(value.shape)}"
            )

    def __repr__(self) -> str:
        tensors = ", ".join(
            f"{key}: {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
            for key, tensor in self.tensors.items()
        )
        return f"Batch(size={len(self)}, tensors={{{tensors}}}, non_tensors={list(self.non_tensors)}, meta={self.meta})"

    # ------------------------------------------------------------------------------------------------- rows

    def _select_rows(self, index: RowIndex) -> Batch:
        rows = _normalize_row_index(index, len(self))
        if isinstance(rows, slice):
            non_tensors = {key: values[rows] for key, values in self.non_tensors.items()}
        else:
            positions = rows.tolist()
            non_tensors = {key: [values[i] for i in positions] for key, values in self.non_tensors.items()}
        return Batch._from_parts(self.tensors[rows], non_tensors, dict(self.meta))

    def select(self, keys: Iterable[str]) -> Batch:
        """A Batch with only the named fields (meta is kept)."""
        keys = list(keys)
        missing = [key for key in keys if key not in self]
        if missing:
            raise KeyError(f"Batch.select: no fields {missing}; the fields are {self.keys()}")
        tensor_keys = [key for key in keys if key not in self.non_tensors]
        return Batch._from_parts(
            self.tensors.select(*tensor_keys),
            {key: self.non_tensors[key] for key in keys if key in self.non_tensors},
            dict(self.meta),
        )

    @classmethod
    def concat(cls, parts: Sequence[Batch]) -> Batch:
        """Stack batches row-wise, in order. All parts need the same fields; their meta dicts are merged."""
        if not parts:
            raise ValueError("Batch.concat needs at least one Batch, got an empty sequence")
        first = parts[0]
        first_tensor_keys = set(first._tensor_keys())
        for position, part in enumerate(parts[1:], start=1):
            if set(part._tensor_keys()) != first_tensor_keys or part.non_tensors.keys() != first.non_tensors.keys():
                raise ValueError(
                    f"Batch.concat: part {position} has fields {sorted(part.keys())} but part 0 has "
                    f"{sorted(first.keys())}; select the same fields in every part"
                )
        for key in first_tensor_keys:
            trailing_shapes = [tuple(part.tensors[key].shape[1:]) for part in parts]
            if len(set(trailing_shapes)) > 1:
                raise ValueError(
                    f"Batch.concat: field {key!r} has per-sample shapes {trailing_shapes} across the parts; pad them "
                    f"to the same width before concatenating"
                )
        tensors = cast(TensorDict, torch.cat([part.tensors for part in parts], dim=0))
        non_tensors = {
            key: list(itertools.chain.from_iterable(part.non_tensors[key] for part in parts))
            for key in first.non_tensors
        }
        return cls._from_parts(tensors, non_tensors, _merge_meta([part.meta for part in parts]))

    @classmethod
    def merge(cls, parts: Sequence[Batch]) -> Batch:
        """The same rows with the fields of every part: a field in several parts takes the last part's value, and
        meta keeps each key's first value. Parts must have the same number of rows (a role's output for a batch)."""
        if not parts:
            raise ValueError("Batch.merge needs at least one Batch, got an empty sequence")
        sizes = [len(part) for part in parts]
        if len(set(sizes)) != 1:
            raise ValueError(f"Batch.merge: the parts have {sizes} rows; each part must cover the same rows")
        first = parts[0]
        # A shallow copy of the first part; setting each later field checks it as any assignment does.
        merged = cls._from_parts(first.tensors.copy(), dict(first.non_tensors), dict(first.meta))
        for part in parts[1:]:
            for key in part.keys():  # noqa: SIM118 - a Batch refuses iteration
                merged[key] = part[key]
            for key, value in part.meta.items():
                merged.meta.setdefault(key, value)
        return merged

    def split(self, num_parts: int, *, balance_by_tokens: bool = False) -> BatchParts:
        """Split into `num_parts` Batches whose sizes differ by at most one.

        Evenly: contiguous chunks in order (the first parts take the extra rows, as `numpy.array_split`).
        Balanced by tokens: rows are assigned by `balanced_partition` on `attention_mask` sums so each part carries
        about the same number of tokens; each part keeps its rows in their original order. Either way
        `parts.gather(results)` puts per-part results back in the original row order, and `parts.token_counts` has
        the tokens of each part.
        """
        if num_parts < 1:
            raise ValueError(f"Batch.split needs num_parts >= 1, got {num_parts}")
        lengths = self.sequence_lengths() if "attention_mask" in self else None
        if balance_by_tokens:
            if lengths is None:
                raise KeyError(
                    f"Batch.split(balance_by_tokens=True) counts tokens from 'attention_mask', which this Batch "
                    f"lacks (fields: {self.keys()}); add it or split evenly"
                )
            groups = [
                torch.tensor(group, dtype=torch.long) for group in balanced_partition(lengths.tolist(), num_parts)
            ]
            parts = [self[group] for group in groups]
        else:
            starts = [0, *itertools.accumulate(even_sizes(len(self), num_parts))]
            groups = [torch.arange(starts[i], starts[i + 1]) for i in range(num_parts)]
            parts = [self[starts[i] : starts[i + 1]] for i in range(num_parts)]
        token_counts = None if lengths is None else [int(lengths[group].sum()) for group in groups]
        return BatchParts(parts, groups, token_counts)

    def sequence_lengths(self) -> torch.Tensor:
        """Number of real tokens per sample (the sum of `attention_mask` over its last dimension)."""
        return self["attention_mask"].sum(dim=-1)

    # ----------------------------------------------------------------------------------------------- memory

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """The same Batch with every tensor on `device` (non-tensor fields and meta are shared, not copied)."""
        tensors = self.tensors.to(device, non_blocking=non_blocking)
        return Batch._from_parts(tensors, dict(self.non_tensors), dict(self.meta))

    def __reduce__(self) -> tuple[Any, ...]:
        # torch pickles a tensor's storage in band (measured 2.4x slower through ray.put/get than raw numpy); a flat
        # uint8 numpy view goes out of band under pickle protocol 5, which Ray uses, so the bytes are not copied.
        buffers = {key: tensor_to_wire(self.tensors[key]) for key in self._tensor_keys()}
        return _rebuild_batch, (len(self), buffers, self.non_tensors, self.meta)

    # -------------------------------------------------------------------------------------------- building

    @classmethod
    def from_generations(
        cls,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        rollout_logprobs: Sequence[Sequence[float]] | None = None,
        *,
        pad_token_id: int,
        prompt_length: int | None = None,
        response_length: int | None = None,
        non_tensors: Mapping[str, Sequence[Any]] | None = None,
        meta: Mapping[str, Any] | None = None,
        response_masks: Sequence[Sequence[int] | None] | None = None,
    ) -> Batch:
        """Assemble per-sample generations into padded tensors, laid out as verl does.

        - `prompt_ids` [B, P]: left-padded with `pad_token_id`; `response_ids` [B, R]: right-padded.
        - `input_ids` = prompt ++ response; `attention_mask` is 1 on real tokens of both.
        - `position_ids`: over the prompt, `max(cumsum(attention_mask) - 1, 0)`; over the response, the last
          prompt position + 1, 2, ..., R (padding included, as in verl).
        - `response_mask` [B, R]: 1 on generated tokens; `rollout_logprobs` [B, R] float32, 0 on padding.
        - `response_masks`: per sample (None for all ones), 1 on the response tokens the model sampled and 0 on
          those a multi-turn rollout appended (tool and environment tokens): `response_mask` is then that mask,
          while `attention_mask` still covers every real token (see response_tokens).

        P and R default to the longest prompt and response; pass `prompt_length` / `response_length` to fix them.
        """
        num_samples = len(prompt_ids)
        if len(response_ids) != num_samples:
            raise ValueError(f"got {num_samples} prompts but {len(response_ids)} responses; give one response each")
        if rollout_logprobs is not None and len(rollout_logprobs) != num_samples:
            raise ValueError(f"got {num_samples} responses but {len(rollout_logprobs)} logprob lists")
        prompt_lengths = [len(ids) for ids in prompt_ids]
        response_lengths = [len(ids) for ids in response_ids]
        empty_prompts = [i for i, length in enumerate(prompt_lengths) if length == 0]
        if empty_prompts:
            raise ValueError(f"samples {empty_prompts[:10]} have empty prompts; every sample needs a prompt token")
        if rollout_logprobs is not None:
            for i, (logprobs, length) in enumerate(zip(rollout_logprobs, response_lengths, strict=True)):
                if len(logprobs) != length:
                    raise ValueError(f"sample {i} has {length} response tokens but {len(logprobs)} rollout logprobs")
        if response_masks is not None:
            if len(response_masks) != num_samples:
                raise ValueError(f"got {num_samples} responses but {len(response_masks)} response masks")
            for i, (given, length) in enumerate(zip(response_masks, response_lengths, strict=True)):
                if given is not None and len(given) != length:
                    raise ValueError(f"sample {i} has {length} response tokens but a response mask of {len(given)}")
        prompt_width = _padded_width("prompt", prompt_lengths, prompt_length)
        response_width = _padded_width("response", response_lengths, response_length)

        prompts, prompt_mask = _pad_rows(prompt_ids, prompt_width, pad_token_id, torch.long, left=True)
        responses, response_mask = _pad_rows(response_ids, response_width, pad_token_id, torch.long, left=False)
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
        prompt_positions = (prompt_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        last_prompt_position = prompt_positions[:, -1:]
        response_positions = last_prompt_position + torch.arange(1, response_width + 1)
        tensors = {
            "prompt_ids": prompts,
            "response_ids": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": attention_mask,
            "position_ids": torch.cat([prompt_positions, response_positions], dim=1),
            "response_mask": response_mask.long(),
        }
        if response_masks is not None:
            sampled = [
                given if given is not None else [1] * len(ids)
                for given, ids in zip(response_masks, response_ids, strict=True)
            ]
            tensors["response_mask"], _ = _pad_rows(sampled, response_width, 0, torch.long, left=False)
        if rollout_logprobs is not None:
            tensors["rollout_logprobs"], _ = _pad_rows(rollout_logprobs, response_width, 0.0, torch.float32, left=False)
        return cls(tensors, non_tensors, meta, size=num_samples)


def response_tokens(batch: Batch) -> torch.Tensor:
    """[B, R] bool: the response's real tokens, sampled or appended by a multi-turn rollout (what a reward reads and
    where a sequence ends), as opposed to response_mask, the tokens trained on."""
    width = batch["response_mask"].shape[1]
    if "attention_mask" in batch:
        return batch["attention_mask"][:, -width:].bool() if width else batch["response_mask"].bool()
    return batch["response_mask"].bool()


class BatchParts(list[Batch]):
    """The parts of a `Batch.split`, with the original row indices of each part and its token count."""

    def __init__(self, parts: Sequence[Batch], indices: Sequence[torch.Tensor], token_counts: list[int] | None):
        super().__init__(parts)
        self.indices = list(indices)
        self.token_counts = token_counts

    def gather(self, results: Sequence[Batch]) -> Batch:
        """Concatenate one result per part and restore the rows to their order before the split."""
        if len(results) != len(self):
            raise ValueError(f"BatchParts.gather needs one result per part ({len(self)}), got {len(results)}")
        for position, (result, part) in enumerate(zip(results, self, strict=True)):
            if len(result) != len(part):
                raise ValueError(
                    f"BatchParts.gather: result {position} has {len(result)} rows but its part had {len(part)}; "
                    f"results must keep one row per input row, in order"
                )
        merged = Batch.concat(results)
        order = torch.cat(self.indices)
        if torch.equal(order, torch.arange(len(order))):
            return merged
        return merged[torch.argsort(order)]


def first_fit_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices 0..n-1 packed into bins whose lengths sum to at most `capacity`: first-fit decreasing (longest first,
    each into the first bin with room), which uses at most 11/9 of the optimal bin count plus one. Each bin's indices
    are in ascending order; bins are in the order they were opened."""
    if capacity < 1:
        raise ValueError(f"first_fit_bins needs a capacity >= 1, got {capacity}")
    too_long = [i for i, length in enumerate(lengths) if length > capacity]
    if too_long:
        raise ValueError(f"items {too_long[:10]} are longer than the bin capacity {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((b for b, free in enumerate(room) if free >= lengths[index]), None)
        if slot is None:
            bins.append([])
            room.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(index)
        room[slot] -= lengths[index]
    return [sorted(b) for b in bins]


def balanced_partition(weights: Sequence[int], num_parts: int) -> list[list[int]]:
    """Split indices 0..n-1 into `num_parts` groups of sizes differing by at most one, with near-equal weight sums.

    Karmarkar-Karp largest differencing with equal group sizes (as verl's seqlen balancing): sort the weights, cut
    them into rows of `num_parts` items, each row a partial solution holding one item per group; then repeatedly
    merge the two partial solutions with the largest spread (max group sum - min group sum), adding the lightest
    groups of one to the heaviest of the other. A merge never raises the larger of the two spreads, so the final
    spread is at most max(weights) - min(weights) (min counts 0 when n is not a multiple of num_parts).
    Returns each group's indices in ascending order.
    """
    if num_parts < 1:
        raise ValueError(f"balanced_partition needs num_parts >= 1, got {num_parts}")
    negative = [i for i, weight in enumerate(weights) if weight < 0]
    if negative:
        raise ValueError(f"balanced_partition needs non-negative weights; indices {negative[:10]} are negative")
    count = len(weights)
    # Zero-weight placeholders fill the last row so every row has num_parts items; sorted first, they all land in
    # one row, hence at most one per group, which is what keeps the group sizes within one of each other.
    padded_count = count + (-count % num_parts)
    order = sorted(range(padded_count), key=lambda i: (i < count, weights[i] if i < count else 0, i))
    heap: list[tuple[int, int, list[tuple[int, list[int]]]]] = []
    for row_number, start in enumerate(range(0, padded_count, num_parts)):
        groups = [(weights[i] if i < count else 0, [i]) for i in order[start : start + num_parts]]
        heapq.heappush(heap, (-_spread(groups), row_number, groups))
    tiebreak = padded_count
    while len(heap) > 1:
        _, _, first = heapq.heappop(heap)
        _, _, second = heapq.heappop(heap)
        first.sort(key=lambda group: group[0], reverse=True)
        second.sort(key=lambda group: group[0])
        merged = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(first, second, strict=True)]
        tiebreak += 1
        heapq.heappush(heap, (-_spread(merged), tiebreak, merged))
    final_groups = heap[0][2] if heap else [(0, []) for _ in range(num_parts)]
    return sorted(
        (sorted(i for i in members if i < count) for _, members in final_groups), key=lambda group: (-len(group), group)
    )


def _spread(groups: list[tuple[int, list[int]]]) -> int:
    sums = [total for total, _ in groups]
    return max(sums) - min(sums)


def even_sizes(count: int, num_parts: int) -> list[int]:
    base, extra = divmod(count, num_parts)
    return [base + 1 if i < extra else base for i in range(num_parts)]


def _normalize_row_index(index: RowIndex, size: int) -> slice | torch.Tensor:
    """A step-1 slice (kept as a view) or a LongTensor of non-negative row positions, range-checked."""
    if isinstance(index, bool):
        raise TypeError(f"a Batch is indexed by int, slice, list of ints, bool mask or LongTensor, got {index!r}")
    if isinstance(index, int | np.integer):
        position = int(index)
        if not -size <= position < size:
            raise IndexError(f"row {position} is out of range for a Batch of {size} rows")
        position %= size
        return slice(position, position + 1)
    if isinstance(index, slice):
        start, stop, step = index.indices(size)
        if step == 1:
            return slice(start, max(start, stop))
        return torch.arange(start, stop, step, dtype=torch.long)
    rows = torch.as_tensor(np.asarray(index) if not isinstance(index, torch.Tensor) else index)
    if rows.ndim != 1:
        raise IndexError(f"Batch row indices must be one-dimensional, got shape {tuple(rows.shape)}")
    if rows.dtype == torch.bool:
        if rows.shape[0] != size:
            raise IndexError(f"a bool row mask must have one entry per row ({size}), got {rows.shape[0]}")
        return rows.nonzero().flatten()
    if rows.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if rows.is_floating_point() or rows.is_complex():
        raise TypeError(f"Batch row indices must be integers, got dtype {rows.dtype}")
    rows = rows.long().cpu()
    out_of_range = rows[(rows < -size) | (rows >= size)]
    if out_of_range.numel():
        raise IndexError(f"rows {out_of_range[:10].tolist()} are out of range for a Batch of {size} rows")
    return rows % size if size else rows


def _as_object_list(key: str, values: Any) -> list[Any]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(
            f"Batch field {key!r} must be a tensor or a sequence with one value per sample, got {_describe(values)}; "
            f"for one value shared by the whole batch use batch.meta[{key!r}]"
        )
    return list(values)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.ndim}-d tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r:.80}"


def _merge_meta(metas: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for position, meta in enumerate(metas):
        for key, value in meta.items():
            if key in merged and not _same_value(merged[key], value):
                raise ValueError(
                    f"Batch.concat: meta[{key!r}] differs between parts ({merged[key]!r} vs {value!r} in part "
                    f"{position}); keep per-part values under distinct keys or in a per-sample field"
                )
            merged[key] = value
    return merged


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def _padded_width(what: str, lengths: list[int], width: int | None) -> int:
    longest = max(lengths, default=0)
    if width is None:
        return longest
    if longest > width:
        sample = lengths.index(longest)
        raise ValueError(f"sample {sample} has a {what} of {longest} tokens, longer than {what}_length={width}")
    return width


def _pad_rows(
    rows: Sequence[Sequence[int]] | Sequence[Sequence[float]],
    width: int,
    fill: float,
    dtype: torch.dtype,
    *,
    left: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of varying length into a [len(rows), width] tensor and its bool mask of real entries."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    columns = torch.arange(width)
    mask = columns >= (width - lengths)[:, None] if left else columns < lengths[:, None]
    padded = torch.full((len(rows), width), fill, dtype=dtype)
    if rows and isinstance(rows[0], torch.Tensor | np.ndarray):
        flat = torch.cat([torch.as_tensor(row).reshape(-1) for row in rows]).to(dtype)
    else:
        flat = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=dtype)
    # Boolean-mask assignment fills row by row, left to right, which is exactly the order of the flattened rows.
    padded[mask] = flat
    return padded, mask


def _rebuild_batch(
    size: int,
    buffers: dict[str, tuple[np.ndarray, torch.dtype, tuple[int, ...]]],
    non_tensors: dict[str, list[Any]],
    meta: dict[str, Any],
) -> Batch:
    tensors = {key: tensor_from_wire(*buffer) for key, buffer in buffers.items()}
    return Batch._from_parts(TensorDict(tensors, batch_size=[size]), non_tensors, meta)
