"""The weight-sync plan: Hugging Face names, dtypes, shapes, and each tensor's bucket and offset; made once per run."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

# Components that torch.compile ('_orig_mod'), FSDP1 and activation checkpointing insert into parameter names, at
# whatever depth they wrap. No model names a submodule so.
WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# DDP's 'module.' is a wrapper only in front: DDP wraps the whole model, and 'module' may be a real submodule's name.
DDP_PREFIX = "module"
TIED_HEAD = "lm_head.weight"
TIED_EMBEDDING = "model.embed_tokens.weight"
TRANSPORTS = ("gloo", "nccl", "cuda_ipc")
# Every tensor starts on a multiple of this, so a uint8 bucket can be viewed as any dtype, and CUDA copies stay aligned.
ALIGN_BYTES = 64

TensorSpec = tuple[str, str, Sequence[int]]  # (name as the sender yields it, dtype name, shape)


class PlanMismatchError(ValueError):
    """The sender's tensors do not match the plan (name, order, dtype or shape)."""


def hf_name(name: str) -> str:
    """The Hugging Face name of a parameter: without the components wrappers add, _orig_mod, _fsdp_wrapped_module
    and _checkpoint_wrapped_module anywhere, and without DDP's module. in front (under or over other wrappers)."""
    parts = name.split(".")
    while parts and parts[0] in WRAPPER_COMPONENTS | {DDP_PREFIX}:
        parts.pop(0)
    return ".".join(part for part in parts if part not in WRAPPER_COMPONENTS)


def dtype_name(dtype: torch.dtype | str) -> str:
    """'float32' for torch.float32 or 'torch.float32'; raises on names torch does not know."""
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype name such as 'float32' or 'bfloat16'")
    return name


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, dtype_name(name))
    assert isinstance(dtype, torch.dtype)
    return dtype


def tensor_specs(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    """(name, dtype, shape) of each tensor in order: the sender's side of planning. Reads metadata only, so a
    DTensor (FSDP2) gives its full shape without gathering."""
    return [(name, dtype_name(t.dtype), tuple(int(d) for d in t.shape)) for name, t in named_tensors]


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor travels: its bucket, its byte offset in that bucket, and the dtype it travels in."""

    name: str  # Hugging Face name, what the engine's load_weights expects
    source_name: str  # the name the sender yields (may carry wrapper prefixes)
    source_dtype: str
    wire_dtype: str
    shape: tuple[int, ...]
    bucket: int
    offset: int

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch_dtype(self.wire_dtype).itemsize


@dataclass(frozen=True)
class SyncPlan:
    """Every tensor of one sync in sender order, packed greedily into buckets of at most `bucket_bytes` bytes.

    A tensor larger than `bucket_bytes` gets a bucket of its own, sized to it. Made once per run by the controller
    from the sender's specs; receivers take it as sent (to_json/from_json) and never recompute it.
    """

    slots: tuple[TensorSlot, ...]
    bucket_sizes: tuple[int, ...]  # used bytes of each bucket
    bucket_bytes: int
    transport: str
    skipped: tuple[str, ...] = ()  # sender names that are not sent (a tied lm_head)

    @classmethod
    def build(
        cls,
        specs: Sequence[TensorSpec],
        *,
        bucket_bytes: int,
        transport: str = "gloo",
        tie_word_embeddings: bool = False,
        wire_dtype: str | torch.dtype | None = None,
    ) -> SyncPlan:
        """Plan a sync of `specs` (sender order).

        tie_word_embeddings: the engine's lm_head shares the embedding, so lm_head.weight is not sent (vLLM skips
            it anyway, and fails if it arrives without the embedding in the same load call).
        wire_dtype: cast floating-point tensors to this dtype on the sender (e.g. the engine's bfloat16 when the
            trainer holds float32), halving bytes; None keeps each tensor's own dtype.
        """
        if bucket_bytes < ALIGN_BYTES:
            raise ValueError(f"bucket_bytes must be at least {ALIGN_BYTES}, got {bucket_bytes}")
        if transport not in TRANSPORTS:
            raise ValueError(f"weight-sync transport {transport!r} is unknown; use one of {TRANSPORTS}")
        wire = None if wire_dtype is None else dtype_name(wire_dtype)
        names = [hf_name(name) for name, _, _ in specs]
        duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
        if duplicates:
            raise ValueError(f"several sender tensors map to the same Hugging Face name(s) {duplicates}")
        skipped: list[str] = []
        if tie_word_embeddings and TIED_HEAD in names:
            if TIED_EMBEDDING not in names:
                raise ValueError(
                    f"the model ties its embeddings, but the sender has {TIED_HEAD!r} and no {TIED_EMBEDDING!r}"
                )
            skipped.append(specs[names.index(TIED_HEAD)][0])
        slots: list[TensorSlot] = []
        sizes: list[int] = []
        used = 0
        for (source, dtype, shape), name in zip(specs, names, strict=True):
            if source in skipped:
                continue
            source_dtype = dtype_name(dtype)
            travels_as = wire if wire is not None and torch_dtype(source_dtype).is_floating_point else source_dtype
            nbytes = _numel(shape) * torch_dtype(travels_as).itemsize
            start = _aligned(used)
            # A new bucket when this one would overflow; an oversized tensor takes an empty bucket of its own.
            if not sizes or (used > 0 and start + nbytes > bucket_bytes):
                sizes.append(0)
                start = 0
            slots.append(
                TensorSlot(name, source, source_dtype, travels_as, tuple(int(d) for d in shape), len(sizes) - 1, start)
            )
            used = start + nbytes
            sizes[-1] = used
        if not slots:
            raise ValueError("nothing to sync: the sender has no tensors (after skipping tied ones)")
        return cls(tuple(slots), tuple(sizes), bucket_bytes, transport, tuple(skipped))

    # ------------------------------------------------------------ queries

    @property
    def num_buckets(self) -> int:
        return len(self.bucket_sizes)

    @property
    def total_bytes(self) -> int:
        return sum(self.bucket_sizes)

    @property
    def max_bucket_size(self) -> int:
        return max(self.bucket_sizes)

    def bucket(self, index: int) -> list[TensorSlot]:
        return self.buckets()[index]

    def buckets(self) -> list[list[TensorSlot]]:
        return self._grouped

    @cached_property
    def _grouped(self) -> list[list[TensorSlot]]:  # a plan never changes: group its slots once
        grouped: list[list[TensorSlot]] = [[] for _ in self.bucket_sizes]
        for slot in self.slots:
            grouped[slot.bucket].append(slot)
        return grouped

    @cached_property
    def fingerprint(self) -> int:
        """A 62-bit digest of the plan; the sender broadcasts it so receivers holding another plan fail at once."""
        digest = hashlib.blake2b(self.to_json().encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 62) - 1)

    # ------------------------------------------------------------ wire format

    def to_json(self) -> str:
        """A JSON string: it survives any RPC layer unchanged (vLLM's collective_rpc re-encodes other objects)."""
        payload: dict[str, Any] = {
            "bucket_bytes": self.bucket_bytes,
            "transport": self.transport,
            "bucket_sizes": list(self.bucket_sizes),
            "skipped": list(self.skipped),
            "slots": [
                [s.name, s.source_name, s.source_dtype, s.wire_dtype, list(s.shape), s.bucket, s.offset]
                for s in self.slots
            ],
        }
        return json.dumps(payload, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SyncPlan:
        payload = json.loads(text)
        slots = tuple(
            TensorSlot(name, source, sdtype, wdtype, tuple(shape), bucket, offset)
            for name, source, sdtype, wdtype, shape, bucket, offset in payload["slots"]
        )
        return cls(
            slots,
            tuple(payload["bucket_sizes"]),
            payload["bucket_bytes"],
            payload["transport"],
            tuple(payload["skipped"]),
        )

    def check_tensor(self, index: int, name: str, tensor: torch.Tensor) -> TensorSlot:
        """The slot for the `index`-th tensor sent; raises PlanMismatchError naming what differs."""
        if index >= len(self.slots):
            raise PlanMismatchError(
                f"the sender yielded more tensors than the plan holds ({len(self.slots)}); extra: {name!r}. "
                "Make the plan from the same iteration the sender runs (same names, same order)."
            )
        slot = self.slots[index]
        if name != slot.source_name:
            raise PlanMismatchError(
                f"tensor {index} of the sync is {name!r}, the plan expects {slot.source_name!r}: the sender must "
                "yield tensors in the order they were planned"
            )
        shape = tuple(int(d) for d in tensor.shape)
        if shape != slot.shape or dtype_name(tensor.dtype) != slot.source_dtype:
            raise PlanMismatchError(
                f"{name!r} is {dtype_name(tensor.dtype)}{list(shape)}, the plan expects "
                f"{slot.source_dtype}{list(slot.shape)}; re-plan after changing the model"
            )
        return slot


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _aligned(offset: int) -> int:
    return (offset + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES
