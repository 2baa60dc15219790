"""An engine's BusyClock and rollouter/idle_ratio from two readings of every engine."""

from __future__ import annotations

import pytest

from rlmesh.metrics import idle_ratio
from rlmesh.roles.rollout import base
from rlmesh.roles.rollout.base import BusyClock


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> tuple[BusyClock, FakeTime]:
    fake = FakeTime()
    monkeypatch.setattr(base.time, "monotonic", fake)
    return BusyClock(), fake


def test_busy_time_counts_overlapping_requests_once_and_leaves_out_pauses(clock: tuple[BusyClock, FakeTime]):
    busy, now = clock
    now.now += 1.0  # idle
    with busy.request():
        now.now += 2.0
        with busy.request():  # overlapping: the engine is busy, not twice as busy
            now.now += 1.0
            with busy.paused():  # a weight sync holds the requests
                now.now += 4.0
            now.now += 0.5
        now.now += 0.5
    now.now += 3.0
    assert busy.reading() == {"busy_s": 4.0, "alive_s": 12.0}


def test_a_pause_with_nothing_in_flight_is_idle_and_a_request_during_a_pause_waits(clock):
    busy, now = clock
    with busy.paused():
        now.now += 1.0
        with busy.request():
            now.now += 2.0
        now.now += 1.0
    assert busy.reading() == {"busy_s": 0.0, "alive_s": 4.0}


def test_idle_ratio_pools_engines_and_restarts_a_replaced_engine_from_zero():
    before = [{"busy_s": 10.0, "alive_s": 20.0}, {"busy_s": 30.0, "alive_s": 50.0}]
    after = [{"busy_s": 13.0, "alive_s": 24.0}, {"busy_s": 1.0, "alive_s": 2.0}]  # engine 1 replaced: 1 of 2 s busy
    assert idle_ratio(before, after) == pytest.approx(1 - (3.0 + 1.0) / (4.0 + 2.0))
    assert idle_ratio(after, after) is None  # no time passed
    with pytest.raises(ValueError):
        idle_ratio(before, after[:1])  # one reading per engine, always
