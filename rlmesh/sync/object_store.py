"""Weight sync through Ray's object store: the trainer exports full HF-named weights once, every engine loads them;
and the sync of a rollout that takes no weights (a replay).

The simple transport for the HF rollout backend and the fallback anywhere: one `ray.put` of the whole state dict
(zero-copy tensors), read by every rollout actor. The bucketed collective transports live beside it.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from rlmesh.mesh import ActorMesh


class ObjectStoreWeightSync:
    """Push the trainer's weights to every rollout actor through the object store."""

    def __init__(self, trainer: ActorMesh[Any], rollout: ActorMesh[Any], timeout_s: float = 600.0) -> None:
        self.trainer, self.rollout, self.timeout_s = trainer, rollout, timeout_s
        self.version = 0

    def setup(self) -> None:
        """Nothing to form: the object store is always there."""

    def push(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        self.rollout.load_weights.all(self._export(), version).result(timeout=self.timeout_s)
        self.version = version
        return {"timing_s/sync_transfer": time.perf_counter() - t0}

    def on_rollout_restart(self, rollout: ActorMesh[Any], positions: list[int]) -> None:
        """Give replaced engines the current weights before they take requests."""
        if self.version == 0:
            return  # engines start from the same checkpoint as the trainer
        ray.get([rollout.actors[p].load_weights.remote(self._export(), self.version) for p in positions])

    def _export(self) -> ray.ObjectRef:
        """Rank 0's exported state dict, as a reference: engines read it from the object store, the controller
        never holds the weights. Every rank takes part (FSDP gathers in lockstep) and must finish."""
        exported = self.trainer.export_weights.all()
        ray.get(exported.refs[1:], timeout=self.timeout_s)
        return exported.refs[0]


class NoWeightSync:
    """The weight sync of a rollout that takes no weights (a replay of dumped samples): a push only counts the
    version."""

    def __init__(self) -> None:
        self.version = 0

    def setup(self) -> None:
        """Nothing to form."""

    def push(self, version: int) -> dict[str, float]:
        self.version = version
        return {}

    def on_rollout_restart(self, rollout: ActorMesh[Any], positions: list[int]) -> None:
        """A replaced replay actor reads the dump again: nothing to send."""
