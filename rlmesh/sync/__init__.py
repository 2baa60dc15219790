"""Weight transfer from the trainer mesh to the rollout mesh: object store, or bucketed collectives."""

from rlmesh.sync.object_store import ObjectStoreWeightSync

__all__ = ["ObjectStoreWeightSync"]
