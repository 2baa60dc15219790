"""Which dtype and device a role runs in, from its config's names."""

from __future__ import annotations

import pytest
import torch

from rlmesh.engine.devices import compute_dtype


def test_dtype_auto_is_bfloat16_on_cuda_and_float32_on_cpu() -> None:
    assert compute_dtype("auto", "cpu") == torch.float32
    assert compute_dtype("auto", "cuda") == torch.bfloat16
    assert compute_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match=r"model\.dtype='fp8'"):
        compute_dtype("fp8", "cpu")
