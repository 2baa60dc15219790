"""Zero-copy pickling of torch tensors for Ray: bytes travel out of band as numpy buffers, never in the pickle.

torch pickles a tensor's whole storage in band (a row slice ships every row of its base tensor); a flat uint8
numpy view goes out of band under pickle protocol 5, which Ray uses, so only the slice's bytes are copied once.
Receivers get tensors over the object store's memory: clone before writing in place.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch


def tensor_to_wire(tensor: torch.Tensor) -> tuple[np.ndarray, torch.dtype, tuple[int, ...]]:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    # A uint8 view covers dtypes numpy lacks (bfloat16, float8) without converting values.
    return flat.view(torch.uint8).numpy(), tensor.dtype, tuple(tensor.shape)


def tensor_from_wire(buffer: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    with warnings.catch_warnings():
        # Arrays read from Ray's object store are flagged read-only; see the module docstring.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        raw = torch.from_numpy(buffer)
    return raw.view(dtype).reshape(shape)


class WireTensor:
    """A tensor that unpickles as a plain torch.Tensor, sent zero-copy."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def __reduce__(self) -> tuple[Any, ...]:
        return tensor_from_wire, tensor_to_wire(self.tensor)
