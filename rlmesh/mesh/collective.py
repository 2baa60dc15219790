"""Collective groups that span meshes (e.g. trainer rank 0 + every rollout actor), without torch's default group.

Each group is a TCPStore plus the backend's ProcessGroup class, so one process can belong to several groups.
Every operation takes a timeout: a missing or dead peer raises instead of hanging. The controller forms and tears
down groups here; inside an actor, rlmesh.mesh.process_groups holds this process's memberships (re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from rlmesh.mesh.futures import settle
from rlmesh.mesh.mesh import ActorMesh
from rlmesh.mesh.process_groups import (
    BIND_HOST_ENV,
    CollectiveError,
    GroupHandle,
    bind_host,
    free_port,
    get_group,
    gloo_options,
    host_store,
    interface_of,
    join,
    leave,
    node_ip,
    open_store,
)

__all__ = [
    "BACKENDS",
    "BIND_HOST_ENV",
    "CollectiveError",
    "CollectiveGroup",
    "GroupHandle",
    "bind_host",
    "create_collective_group",
    "free_port",
    "get_group",
    "gloo_options",
    "host_store",
    "interface_of",
    "join",
    "join_on",
    "leave",
    "leave_on",
    "node_ip",
    "open_store",
    "open_store_on",
]

BACKENDS = ("gloo", "nccl")


# ---------------------------------------------------------------- membership, from the controller


def open_store_on(mesh: ActorMesh[Any], pos: int, name: str, world_size: int, timeout_s: float) -> Any:
    """The actor at `pos` of `mesh` hosts group `name`'s store (it will be rank 0): a ref to its (address, port)."""
    return mesh._root._actor_at(pos)._rlmesh_open_store.remote(name, world_size, timeout_s)


def join_on(
    mesh: ActorMesh[Any],
    pos: int,
    name: str,
    backend: str,
    addr: str,
    port: int,
    rank: int,
    world_size: int,
    timeout_s: float,
) -> Any:
    """The actor at `pos` of `mesh` joins group `name` as `rank`: a ref that resolves once it has."""
    return mesh._root._actor_at(pos)._rlmesh_join_group.remote(name, backend, addr, port, rank, world_size, timeout_s)


def leave_on(mesh: ActorMesh[Any], pos: int, name: str) -> Any:
    """The actor at `pos` of `mesh` leaves group `name`: a ref to whether it was in it."""
    return mesh._root._actor_at(pos)._rlmesh_leave_group.remote(name)


@dataclass
class CollectiveGroup:
    """A formed group, as the controller sees it: its name and which actor holds which rank."""

    name: str
    backend: str
    members: list[tuple[ActorMesh[Any], int]]  # (root mesh, actor position) in rank order
    timeout_s: float

    @property
    def world_size(self) -> int:
        return len(self.members)

    def destroy(self) -> None:
        refs: list[Any] = [leave_on(mesh, pos, self.name) for mesh, pos in self.members]
        ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)


def create_collective_group(
    meshes: Sequence[ActorMesh[Any]], *, backend: str = "gloo", name: str = "default", timeout_s: float = 60.0
) -> CollectiveGroup:
    """Form a group over every actor of `meshes`, ranked in order (the first mesh's first actor is rank 0).

    Sub-meshes select members: `create_collective_group([trainer[0], rollout], backend="nccl", name="weights")`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"collective backend {backend!r} is unknown; use one of {BACKENDS}")
    members = [(m._root, pos, m._describe_position(pos)) for m in meshes for pos in m._positions]
    if len({(id(root), pos) for root, pos, _ in members}) != len(members):
        raise ValueError("an actor appears twice in the collective group's meshes")
    world = len(members)
    root0, pos0, who0 = members[0]
    addr: str
    port: int
    try:
        addr, port = ray.get(open_store_on(root0, pos0, name, world, timeout_s), timeout=timeout_s)
    except Exception as err:
        raise CollectiveError(f"collective group '{name}': rank 0 ({who0}) could not host the store: {err}") from err
    refs = [
        join_on(root, pos, name, backend, addr, port, rank, world, timeout_s)
        for rank, (root, pos, _) in enumerate(members)
    ]
    # Members that reach the store wait for the rest up to timeout_s, so allow a little past it.
    problems = settle(refs, timeout_s + 10).problems(
        [f"rank {rank} ({who})" for rank, (_, _, who) in enumerate(members)]
    )
    if problems:
        for root, pos, _ in members:
            leave_on(root, pos, name)
        raise CollectiveError(
            f"collective group '{name}' ({backend}, world size {world}) could not form within {timeout_s:.0f}s: "
            + "; ".join(problems)
        )
    return CollectiveGroup(name, backend, [(root, pos) for root, pos, _ in members], timeout_s)
