"""How a run fails, stops and recovers: calls to stateless roles are repeated on replaced actors, any other lost actor
ends the run with an error naming the step, a signal stops it at a step boundary, and a run whose updates keep being
skipped for non-finite values is stopped before it wastes more compute."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlmesh.mesh import ActorDiedError, ActorMesh, MeshFuture

log = logging.getLogger(__name__)

# A stateless role's call is repeated at most this often when its actors keep dying.
MAX_REISSUES = 2


class RunFailed(RuntimeError):
    """The run cannot go on; the message names the step, what failed and where the last checkpoint is."""


class RunInterrupted(RuntimeError):
    """A stop was requested (Ctrl-C, SIGTERM); the run stopped at a step boundary after checkpointing."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name


class StopRequest:
    """Set by a signal handler; the loop finishes the step it is in, checkpoints and stops."""

    def __init__(self) -> None:
        self.signal_name: str | None = None


@dataclass
class RoleCall:
    """A call in flight on one role's mesh. `reissue`, given for roles whose actors hold no training state (reward,
    reference), repeats it: a replaced actor computes the same answer."""

    role: str
    mesh: ActorMesh[Any]
    future: MeshFuture[Any]
    reissue: Callable[[], MeshFuture[Any]] | None = None

    def result(self, metrics: dict[str, float]) -> Any:
        """The call's result. If the role lost an actor and may repeat the call, the dead actors are replaced, the
        call repeated, and recovery/<role>_restarts counted in `metrics`; otherwise the ActorDiedError is raised."""
        future = self.future
        for attempt in range(MAX_REISSUES + 1):
            try:
                return future.result()
            except ActorDiedError as err:
                if self.reissue is None or attempt == MAX_REISSUES:
                    raise
                restarted = self.mesh.restart_dead()
                log.warning("role '%s' lost %s (%s); repeating the call", self.role, restarted, err)
                key = f"recovery/{self.role}_restarts"
                metrics[key] = metrics.get(key, 0.0) + len(restarted)
                future = self.reissue()
        raise AssertionError("unreachable")


class SkippedUpdates:
    """Counts, per learning role, the steps in a row whose every optimizer step was skipped for a non-finite loss or
    gradient (<role>/skipped_steps == <role>/optimizer_steps): the weights have not moved since."""

    ROLES = ("actor", "critic")  # the metric prefixes of the learners

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: never stop
        self.in_a_row = dict.fromkeys(self.ROLES, 0)

    def check(self, metrics: dict[str, float]) -> str | None:
        """After a step: why the run must stop, or None."""
        for role in self.in_a_row:
            skipped, taken = metrics.get(f"{role}/skipped_steps"), metrics.get(f"{role}/optimizer_steps")
            if skipped is None or taken is None:
                continue
            self.in_a_row[role] = self.in_a_row[role] + 1 if skipped >= taken else 0
            if self.limit > 0 and self.in_a_row[role] >= self.limit:
                return (
                    f"every {role} update of the last {self.limit} steps was skipped because the loss or gradient was "
                    f"not finite ({role}/grad_norm={metrics.get(f'{role}/grad_norm')}); the weights have not changed "
                    "since. Check the rewards and advantages for huge values, lower the learning rate, or raise "
                    f"trainer.max_consecutive_skipped_steps (now {self.limit})"
                )
        return None
