"""Run as a script by test_multinode: SPREAD vs PACK on a 3-node ray.cluster_utils.Cluster on this machine.

It needs its own Ray cluster, so it runs in a subprocess beside the test session's cluster. Prints one JSON line.
"""

from __future__ import annotations

import json

import ray
from ray.cluster_utils import Cluster

from rlmesh.mesh import ActorMesh, endpoint


class NodeReporter:
    @endpoint
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def main() -> None:
    cluster = Cluster()
    for _ in range(3):
        cluster.add_node(num_cpus=2, include_dashboard=False)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        spread = ActorMesh(NodeReporter, 3, resources={"CPU": 0.5}, strategy="SPREAD", name="spread")
        pack = ActorMesh(NodeReporter, 3, resources={"CPU": 0.5}, strategy="PACK", name="pack")
        out = {
            "spread_nodes": len(set(spread.node.all().result(timeout=60))),
            "pack_nodes": len(set(pack.node.all().result(timeout=60))),
            "cluster_nodes": len([n for n in ray.nodes() if n["Alive"]]),
        }
        spread.shutdown()
        pack.shutdown()
        print(json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
