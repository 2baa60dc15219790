"""Weight transfer from the trainer mesh to the rollout mesh: object store, or bucketed collectives."""

from rlmesh.sync.collective_sync import CollectiveWeightSync
from rlmesh.sync.manifest import SyncPlan
from rlmesh.sync.object_store import NoWeightSync, ObjectStoreWeightSync
from rlmesh.sync.sender import member_group, send_weights

__all__ = ["CollectiveWeightSync", "NoWeightSync", "ObjectStoreWeightSync", "SyncPlan", "member_group", "send_weights"]
