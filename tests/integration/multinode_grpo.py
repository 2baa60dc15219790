"""Run as a script by test_multinode: a short GRPO run on a 3-node ray.cluster_utils.Cluster on this machine, each
role placed on its own node by a resource label (cluster.address joins the cluster). Prints one JSON line: the
node label each role's actors ran on, and the steps trained.

It needs its own Ray cluster, so it runs in a subprocess beside the test session's cluster."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from rlmesh.train import run
from tests.conftest import compose_config

LABELS = ("trainer_node", "rollout_node", "reward_node")


def main() -> None:
    cluster = Cluster()
    for label in LABELS:
        cluster.add_node(num_cpus=2, resources={label: 1}, include_dashboard=False)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as out:
            history = run(
                compose_config(
                    "rollout=hf",
                    f"cluster.address={cluster.address}",
                    "data.train_batch_size=8",
                    "roles.rollout.n=4",
                    "roles.trainer.ppo_mini_batch_size=8",
                    "roles.trainer.ppo_micro_batch_size_per_device=32",
                    # a resource label in each role's request: Ray places its actors on a node that has it
                    "+roles.trainer.resources_per_device.trainer_node=0.1",
                    "+roles.rollout.resources_per_engine.rollout_node=0.1",
                    "+roles.reward.resources_per_actor.reward_node=0.1",
                    "roles.reward.num_workers=1",
                    "trainer.total_steps=2",
                    "trainer.val_before_train=false",
                    "trainer.test_freq=-1",
                    "trainer.save_freq=0",
                    "trainer.logger=[jsonl]",
                    "trainer.progress_bar=false",
                    f"trainer.output_dir={out}",
                )
            )
            label_of = {
                node["NodeID"]: next(label for label in LABELS if label in node["Resources"])
                for node in ray.nodes()
                if node["Alive"]
            }
            # where each role's actors ran, as the step's trace records it (a process per mesh, the node per span)
            events = json.loads((Path(out) / "traces" / "step_000001.json").read_text())["traceEvents"]
            meshes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
            placed: dict[str, set[str]] = {}
            for event in events:
                if event["ph"] == "X" and meshes[event["pid"]] != "controller":
                    placed.setdefault(meshes[event["pid"]], set()).add(label_of[event["args"]["node"]])
        placed_lists = {role: sorted(labels) for role, labels in placed.items()}
        print(
            json.dumps(
                {"placed": placed_lists, "steps": len(history), "grad_norm": max(m["actor/grad_norm"] for m in history)}
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
