"""The actor-mesh runtime on Ray: shaped actor groups, typed endpoints, routing, sharding, faults, collectives."""

from rlmesh.mesh.collective import CollectiveError, CollectiveGroup, GroupHandle, create_collective_group, get_group
from rlmesh.mesh.context import MeshRank, current_rank
from rlmesh.mesh.endpoint import EndpointMethod, endpoint
from rlmesh.mesh.futures import ActorDiedError, MeshFuture, wait_all
from rlmesh.mesh.mesh import ActorMesh, Endpoint, MeshStartError
from rlmesh.mesh.placement import Placement, PlacementError
from rlmesh.mesh.routing import (
    LeastLoadedRouter,
    Load,
    PowerOfTwoRouter,
    RandomRouter,
    RoundRobinRouter,
    Router,
    StickyRouter,
)
from rlmesh.mesh.shape import Shape
from rlmesh.mesh.stored import Stored, StoredRows, run_stored, start_store_worker

__all__ = [
    "ActorDiedError",
    "ActorMesh",
    "CollectiveError",
    "CollectiveGroup",
    "Endpoint",
    "EndpointMethod",
    "GroupHandle",
    "LeastLoadedRouter",
    "Load",
    "MeshFuture",
    "MeshRank",
    "MeshStartError",
    "Placement",
    "PlacementError",
    "PowerOfTwoRouter",
    "RandomRouter",
    "RoundRobinRouter",
    "Router",
    "Shape",
    "StickyRouter",
    "Stored",
    "StoredRows",
    "create_collective_group",
    "current_rank",
    "endpoint",
    "get_group",
    "run_stored",
    "start_store_worker",
    "wait_all",
]
