"""Which dtype and device a role runs in, from its config's names."""

from __future__ import annotations

import pytest
import torch

from rlmesh.engine.devices import resolve_device, resolve_dtype


def test_dtype_auto_is_bfloat16_on_cuda_and_float32_on_cpu() -> None:
    assert resolve_dtype("auto", device="cpu") == torch.float32
    assert resolve_dtype("auto", device="cuda") == torch.bfloat16
    assert resolve_dtype("auto", device=torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bfloat16", device="cpu") == torch.bfloat16
    assert resolve_dtype("float16", device="cpu") == torch.float16
    with pytest.raises(ValueError, match=r"dtype 'fp8' is not a known dtype; use auto or one of float32, bfloat16"):
        resolve_dtype("fp8", device="cpu")
    # Only the three float dtypes a role computes in, not whatever torch names.
    for name in ("float64", "half", "int8"):
        with pytest.raises(ValueError, match="is not a known dtype"):
            resolve_dtype(name, device="cpu")


def test_the_first_name_that_is_set_wins_and_the_rest_follow_the_trainer() -> None:
    # A rollout's own dtype, else the model's (the trainer's), else the device default: the vLLM engine's rule.
    assert resolve_dtype("auto", "auto", device="cpu") == torch.float32
    assert resolve_dtype("auto", "auto", device="cuda") == torch.bfloat16
    assert resolve_dtype("auto", "float16", device="cuda") == torch.float16
    assert resolve_dtype("float32", "bfloat16", device="cuda") == torch.float32
    assert resolve_dtype(None, "", "bfloat16", device="cpu") == torch.bfloat16
    # A bad name is refused even where a later one is fine: it is the one the role would use.
    with pytest.raises(ValueError, match="'bf16'"):
        resolve_dtype("bf16", "float32", device="cpu")


def test_devices_are_cpu_cuda_or_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected_auto
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda', got 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no GPU here"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
