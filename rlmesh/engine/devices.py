"""The torch device and compute dtype a role runs in, from the names its config gives."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(*names: str | None, device: str | torch.device) -> torch.dtype:
    """The first of `names` that is set and not 'auto' (float32 | bfloat16 | float16), so a role's own setting goes
    before the model's; when none is, bfloat16 on CUDA and float32 on CPU, what the trainer computes in."""
    for name in names:
        if name and name != "auto":
            if name not in DTYPES:
                raise ValueError(f"dtype {name!r} is not a known dtype; use auto or one of {', '.join(DTYPES)}")
            return DTYPES[name]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_device(device: str) -> torch.device:
    """The torch device for 'cpu', 'cuda' (the GPU Ray made visible to this actor) or 'auto' (cuda if torch sees
    a GPU, else cpu)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch sees no GPU here; give the mesh GPU resources or use cpu")
        return torch.device("cuda", torch.cuda.current_device())
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
