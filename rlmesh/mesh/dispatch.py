"""Default `shard` dispatch and collect: split arguments along dim 0 into equal padded parts, gather in order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlmesh.wire import WireTensor


def _is_shardable_object(x: Any) -> bool:
    # The protocol our Batch (and any user container) implements: len, integer-list indexing, Type.concat(parts).
    return hasattr(type(x), "concat") and hasattr(x, "__getitem__") and hasattr(x, "__len__")


def _row_length(x: Any) -> int | None:
    """Rows along dim 0 if `x` is splittable, else None (it is passed whole to every shard)."""
    if isinstance(x, (list, tuple)):
        return len(x)
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return int(x.shape[0]) if x.ndim > 0 else None
    if isinstance(x, Mapping):
        lengths = {k: _row_length(v) for k, v in x.items()}
        splittable = {k: n for k, n in lengths.items() if n is not None}
        if not splittable:
            return None
        if len(splittable) != len(lengths) or len(set(splittable.values())) != 1:
            raise ValueError(
                f"cannot shard a dict whose values are not all splittable with one length: lengths {lengths}; "
                "pass a custom dispatch= to the endpoint or the call"
            )
        return next(iter(splittable.values()))
    if _is_shardable_object(x):
        return len(x)
    return None


def _take(x: Any, start: int, stop: int, n: int) -> Any:
    """Rows [start, stop) of `x`; rows at or past n repeat the last real row (padding)."""
    pad = max(0, stop - max(start, n))
    stop_real = min(stop, n)
    if isinstance(x, (list, tuple)):
        rows = list(x[start:stop_real]) + [x[n - 1]] * pad
        return type(x)(rows) if isinstance(x, tuple) else rows
    if isinstance(x, torch.Tensor):
        t = x[start:stop_real]
        return WireTensor(torch.cat([t, x[n - 1 :].expand(pad, *x.shape[1:])]) if pad else t)
    if isinstance(x, np.ndarray):
        a = x[start:stop_real]
        return np.concatenate([a, np.repeat(x[n - 1 :], pad, axis=0)]) if pad else a
    if isinstance(x, Mapping):
        return {k: _take(v, start, stop, n) for k, v in x.items()}
    return x[list(range(start, stop_real)) + [n - 1] * pad]


@dataclass(frozen=True)
class ShardPlan:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    rows_per_shard: int
    real_rows: list[int]  # rows of each shard that are not padding


def split_args(n_shards: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> ShardPlan:
    """Split every splittable argument into `n_shards` equal parts, padding the tail by repeating the last row.

    Lists, tuples, tensors, numpy arrays, dicts of these and objects with len + list indexing + `concat` are
    split; anything else (ints, strings, None, configs) goes whole to every shard.
    """
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"argument '{k}'", v) for k, v in kwargs.items()]
    lengths = {name: n for name, value in named if (n := _row_length(value)) is not None}
    if not lengths:
        raise ValueError(
            "shard needs at least one splittable argument (list, tuple, tensor, array, dict of them, or Batch); "
            "use .all() to send the same arguments to every actor"
        )
    if len(set(lengths.values())) != 1:
        raise ValueError(f"shard arguments must have the same length along dim 0, got {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("cannot shard an empty batch: every splittable argument has length 0")
    per = -(-n // n_shards)
    calls = []
    for s in range(n_shards):
        start, stop = s * per, (s + 1) * per
        split_a = tuple(_take(a, start, stop, n) if _row_length(a) is not None else a for a in args)
        split_k = {k: _take(v, start, stop, n) if _row_length(v) is not None else v for k, v in kwargs.items()}
        calls.append((split_a, split_k))
    real = [max(0, min(per, n - s * per)) for s in range(n_shards)]
    return ShardPlan(calls=calls, rows_per_shard=per, real_rows=real)


def _trim(result: Any, keep: int, rows: int) -> Any:
    if keep == rows:
        return result
    length = _row_length(result) if not isinstance(result, str) else None
    if length != rows:
        return result  # not row-aligned with the input (a scalar, a metric): nothing to unpad
    if isinstance(result, Mapping):
        return {k: _trim(v, keep, rows) for k, v in result.items()}
    if isinstance(result, (list, tuple, torch.Tensor, np.ndarray)):
        return result[:keep]
    return result[list(range(keep))]


def unpad(results: list[Any], plan: ShardPlan) -> list[Any]:
    """Drop the padding rows from each shard's result; shards made only of padding are dropped whole."""
    return [_trim(r, keep, plan.rows_per_shard) for r, keep in zip(results, plan.real_rows, strict=True) if keep > 0]


def concat(results: list[Any]) -> Any:
    """Gather per-shard results in order: lists and tuples are joined, tensors and arrays concatenated along
    dim 0, dicts merged per key, Batch-like objects through their `concat`; anything else comes back as a list."""
    first = results[0]
    if all(r is None for r in results):
        return None
    if isinstance(first, list):
        return [x for r in results for x in r]
    if isinstance(first, tuple):
        return tuple(x for r in results for x in r)
    if isinstance(first, torch.Tensor) and first.ndim > 0:
        return torch.cat(results)
    if isinstance(first, np.ndarray) and first.ndim > 0:
        return np.concatenate(results)
    if isinstance(first, Mapping):
        return {k: concat([r[k] for r in results]) for k in first}
    if _is_shardable_object(first):
        return type(first).concat(results)
    return list(results)
