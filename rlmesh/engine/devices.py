"""The torch device and compute dtype a role runs in, from the names its config gives."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(name: str, device: str) -> torch.dtype:
    """The dtype forwards run in: `auto` is bfloat16 on CUDA and float32 on CPU; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not a known dtype; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def torch_device(device: str) -> torch.device:
    """The torch device for "cpu" or "cuda" (the one GPU Ray made visible to this actor)."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch sees no GPU here; give the mesh GPU resources or use cpu")
        return torch.device("cuda", torch.cuda.current_device())
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
