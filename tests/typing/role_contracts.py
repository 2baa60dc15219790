"""Checked by mypy in CI (not run): the loop's meshes are typed by their role contracts.

Each `# type: ignore[...]` marks a call mypy must reject (warn_unused_ignores fails the check if it does not).
"""

from __future__ import annotations

from typing import assert_type

from rlmesh.config import SamplingConfig
from rlmesh.data import Batch
from rlmesh.mesh import MeshFuture
from rlmesh.roles.contracts import PolicyMesh, RolloutMesh, ScorerMesh, ValueMesh
from rlmesh.roles.rollout.base import Sample


def calls(rollout: RolloutMesh, trainer: PolicyMesh, reward: ScorerMesh, critic: ValueMesh, batch: Batch) -> None:
    assert_type(rollout.generate.choose([1, 2], 4, SamplingConfig(), 7), MeshFuture[list[Sample]])
    assert_type(trainer.update.shard(batch), MeshFuture[dict[str, float]])
    assert_type(reward.score.shard(batch), MeshFuture[Batch])
    assert_type(trainer.save_checkpoint.all("/tmp/x"), MeshFuture[list[None]])
    assert_type(rollout.fault_counts(), dict[str, int])  # the mesh's own methods stay

    rollout.generate.choose([1, 2], "four")  # type: ignore[arg-type]
    reward.score.shard([1, 2, 3])  # type: ignore[arg-type]
    critic.compute_logprobs.shard(batch)  # type: ignore[misc]
    trainer.update.shard(batch, 1)  # type: ignore[call-arg]
