"""A shut-down mesh's routed calls: queued ones fail with the shutdown's error, later ones at once, and nothing is
restarted or dispatched after it."""

from __future__ import annotations

import pytest

from rlmesh.mesh.futures import ActorDiedError
from rlmesh.mesh.routed import ActorTable, RoutedCalls
from rlmesh.mesh.routing import make_router


def make_calls(restarts: list[int]) -> RoutedCalls:
    table = ActorTable(["actor-0"])
    table.alive, table.all_alive = [False], False  # the only actor is dead: calls wait for the restart
    return RoutedCalls(
        "rollout",
        make_router("least_loaded"),
        None,
        True,
        table=lambda: table,
        describe=lambda pos: f"rollout rank {pos}",
        restart=lambda: restarts.append(1) or [],
    )


def test_close_fails_queued_and_later_calls_and_starts_no_restart():
    restarts: list[int] = []
    calls = make_calls(restarts)
    calls._restarting = True  # a restart is under way: the queued call waits for it, and the one it posts returns
    queued = calls.submit("generate", (), {}, None, True, [0])
    calls.close(ActorDiedError("mesh 'rollout' was shut down"))
    calls._restarting = False
    with pytest.raises(ActorDiedError, match="was shut down"):
        queued.result(timeout=5)
    later = calls.submit("generate", (), {}, None, True, [0])
    with pytest.raises(ActorDiedError, match="was shut down"):
        later.result(timeout=5)
    calls.wake()  # would drain and restart on an open mesh
    calls._restart_in_background()
    assert restarts == [] and calls._work is None
