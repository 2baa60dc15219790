"""Controller state on disk (JSON plus torch.save) and RNG capture/restore for random, numpy and torch."""

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rlmesh.checkpoint import (
    CONTROLLER_STATE_JSON,
    CONTROLLER_STATE_TORCH,
    capture_rng,
    load_controller_state,
    restore_rng,
    save_controller_state,
)


def draws() -> tuple[float, list[float], list[float]]:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_controller_state_round_trip_keeps_values_and_types(tmp_path: Path) -> None:
    state: dict[str, Any] = {
        "step": 7,
        "dataloader": {"epoch": 1, "index": 96, "order": [3, 1, 2]},
        "config": {"lr": 1e-4, "name": "grpo", "extra": None},
        "kl_coef": torch.tensor([0.02]),
        "shape": (2, 3),  # a tuple must come back as a tuple, not a JSON list
        "best": float("nan"),  # not JSON: kept exact through torch.save
    }
    save_controller_state(tmp_path, state)

    plain = json.loads((tmp_path / CONTROLLER_STATE_JSON).read_text())
    assert plain == {"step": 7, "dataloader": state["dataloader"], "config": state["config"]}
    assert (tmp_path / CONTROLLER_STATE_TORCH).is_file()

    loaded = load_controller_state(tmp_path)
    assert loaded.keys() == state.keys()
    assert loaded["step"] == 7 and loaded["dataloader"] == state["dataloader"] and loaded["config"] == state["config"]
    assert torch.equal(loaded["kl_coef"], state["kl_coef"])
    assert loaded["shape"] == (2, 3) and isinstance(loaded["shape"], tuple)
    assert math.isnan(loaded["best"])


def test_json_only_state_writes_no_torch_file(tmp_path: Path) -> None:
    save_controller_state(tmp_path, {"step": 1})
    assert not (tmp_path / CONTROLLER_STATE_TORCH).exists()
    assert load_controller_state(tmp_path) == {"step": 1}


def test_rng_round_trip_through_disk_replays_the_same_draws(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state, which must be restored too
    save_controller_state(tmp_path, {"step": 2, "rng": capture_rng()})
    expected = draws()
    expected_gauss = np.random.randn()

    draws()  # advance every generator past the capture point
    restore_rng(load_controller_state(tmp_path)["rng"])

    assert draws() == expected
    assert np.random.randn() == expected_gauss


def test_restoring_an_old_state_differs_from_continuing() -> None:
    # The control for the test above: without restore_rng the draws after capture do not repeat.
    torch.manual_seed(0)
    captured = capture_rng()
    first = draws()
    assert draws() != first
    restore_rng(captured)
    assert draws() == first


def test_load_without_state_json_names_the_folder_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"state.json.*save_controller_state"):
        load_controller_state(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU RNG tests cover the rest")
def test_cuda_rng_round_trip() -> None:
    torch.rand(1, device="cuda")  # capture_rng only records CUDA once this process uses it
    captured = capture_rng()
    assert len(captured["torch_cuda"]) == torch.cuda.device_count()
    expected = torch.rand(4, device="cuda").tolist()
    torch.rand(4, device="cuda")
    restore_rng(captured)
    assert torch.rand(4, device="cuda").tolist() == expected
