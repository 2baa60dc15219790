"""Where an actor sits in its mesh: rank, coordinates, shape and world size, readable from inside the actor."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MeshRank:
    """An actor's place in its mesh. `coords` and `shape` are keyed by dimension name."""

    mesh_name: str
    rank: int
    coords: dict[str, int]
    shape: dict[str, int]
    world_size: int
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, distributed: bool) -> dict[str, str]:
        """Environment variables for this actor; `distributed` adds torch.distributed's rendezvous variables."""
        env = {"RAY_ACTOR_MESH_RANK": str(self.rank), **self.extra_env}
        if distributed:
            env.update(
                RANK=str(self.rank),
                WORLD_SIZE=str(self.world_size),
                LOCAL_RANK=str(self.local_rank),
                LOCAL_WORLD_SIZE=str(self.local_world_size),
            )
            if self.master_addr is not None:
                env.update(MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))
        return env


_current: MeshRank | None = None


def _enter(place: MeshRank, distributed: bool) -> None:
    global _current
    _current = place
    os.environ.update(place.env(distributed))


def current_rank() -> MeshRank:
    """The calling actor's place in its mesh. Raises outside a mesh actor."""
    if _current is None:
        raise RuntimeError("current_rank() is only available inside an actor created by an ActorMesh")
    return _current
