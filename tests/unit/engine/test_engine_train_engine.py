"""The train engine's LR schedules: warmup, then constant, cosine or linear decay to a floor."""

from __future__ import annotations

import pytest
import torch

from rlmesh.config import OptimConfig
from rlmesh.engine.train_engine import build_optimizer, build_scheduler


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_scheduler_warms_up_then_decays_to_the_floor_and_stays(kind: str) -> None:
    optim = OptimConfig(lr=1.0, lr_warmup_steps=2, lr_scheduler=kind, min_lr_ratio=0.1)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim)
    scheduler = build_scheduler(optimizer, optim, total_steps=12)
    lrs = []
    for _ in range(16):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)  # linear warmup over 2 steps
    assert lrs[7] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the 10 decay steps, either shape
    assert lrs[5] > lrs[7] > lrs[9]
    if kind == "linear":
        assert lrs[4] - lrs[5] == pytest.approx(lrs[8] - lrs[9])
    assert lrs[12:] == pytest.approx([0.1] * 4)


def test_constant_scheduler_warms_up_then_holds() -> None:
    optim = OptimConfig(lr=2.0, lr_warmup_steps=2)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim)
    scheduler = build_scheduler(optimizer, optim, total_steps=-1)
    lrs = []
    for _ in range(5):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 2.0, 2.0])


def test_a_decaying_schedule_needs_a_total() -> None:
    optim = OptimConfig(lr_scheduler="cosine", lr_warmup_steps=5)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim)
    with pytest.raises(ValueError, match=r"optim\.total_training_steps"):
        build_scheduler(optimizer, optim, total_steps=-1)
    with pytest.raises(ValueError, match="lr_scheduler='step' is unknown"):
        build_scheduler(optimizer, OptimConfig(lr_scheduler="step"), total_steps=10)
