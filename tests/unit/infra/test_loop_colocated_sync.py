"""The loop's weight update around sleeping colocated engines: weights wake before the sync, the KV cache after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rlmesh.config import RlmeshConfig
from rlmesh.loop import RLLoop, Roles


class Done:
    def __init__(self, value: Any = None) -> None:
        self.value = value

    def result(self, timeout: float | None = None) -> Any:
        return self.value


class Verb:
    def __init__(self, log: list[str], name: str, fail_on: Any = None) -> None:
        self.log, self.name, self.fail_on = log, name, fail_on

    def all(self, *args: Any) -> Done:
        self.log.append(f"{self.name}{list(args)}")
        if args and args[0] == self.fail_on:
            raise RuntimeError(f"{self.name} failed: an engine died")
        return Done()


class FakeRollout:
    def __init__(self, log: list[str], fail_waking: Any = None) -> None:
        self.sleep, self.wake_up = Verb(log, "sleep"), Verb(log, "wake_up", fail_waking)


class FakeSync:
    def __init__(self, log: list[str], fail: bool = False) -> None:
        self.log, self.fail = log, fail

    def setup(self) -> None: ...

    def push(self, version: int) -> dict[str, float]:
        self.log.append(f"push {version}")
        if self.fail:
            raise RuntimeError("a peer died")
        return {"weight_sync/version": float(version)}


def make_loop(
    tmp_path: Path, log: list[str], *, colocate: bool, sleep: bool, fail: bool = False, fail_waking: Any = None
) -> RLLoop:
    cfg = RlmeshConfig()
    cfg.roles.rollout.colocate_with_trainer, cfg.roles.rollout.enable_sleep_mode = colocate, sleep
    roles = Roles(None, FakeRollout(log, fail_waking), None, None, None, FakeSync(log, fail))  # type: ignore[arg-type]
    return RLLoop(cfg, roles, None, [], 0, tmp_path, None)  # type: ignore[arg-type]


def test_sleeping_engines_wake_weights_before_the_sync_and_kv_cache_after(tmp_path: Path):
    log: list[str] = []
    metrics = make_loop(tmp_path, log, colocate=True, sleep=True).update_rollout_weights(version=3)
    assert log == ["wake_up[['weights']]", "push 3", "wake_up[['kv_cache']]"]
    assert metrics == {"weight_sync/version": 3.0}


def test_the_kv_cache_wakes_even_when_the_sync_fails(tmp_path: Path):
    log: list[str] = []
    with pytest.raises(RuntimeError, match="a peer died"):
        make_loop(tmp_path, log, colocate=True, sleep=True, fail=True).update_rollout_weights(version=4)
    assert log == ["wake_up[['weights']]", "push 4", "wake_up[['kv_cache']]"]


def test_a_failed_sync_is_the_error_reported_even_when_waking_fails_after_it(tmp_path: Path):
    log: list[str] = []
    loop = make_loop(tmp_path, log, colocate=True, sleep=True, fail=True, fail_waking=["kv_cache"])
    with pytest.raises(RuntimeError, match="a peer died"):
        loop.update_rollout_weights(version=6)
    loop = make_loop(tmp_path, log, colocate=True, sleep=True, fail_waking=["kv_cache"])
    with pytest.raises(RuntimeError, match="wake_up failed"):  # after a good sync, a failed wake-up is the error
        loop.update_rollout_weights(version=7)


@pytest.mark.parametrize(("colocate", "sleep"), [(False, False), (True, False), (False, True)])
def test_engines_that_do_not_sleep_are_only_synced(tmp_path: Path, colocate: bool, sleep: bool):
    log: list[str] = []
    make_loop(tmp_path, log, colocate=colocate, sleep=sleep).update_rollout_weights(version=5)
    assert log == ["push 5"]
