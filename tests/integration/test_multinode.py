"""Placement strategies on a real multi-node cluster (3 Ray nodes on this machine, in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_spread_uses_every_node_and_pack_uses_one():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.multinode_placement"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"spread_nodes": 3, "pack_nodes": 1, "cluster_nodes": 3}


def test_a_grpo_run_places_each_role_on_the_node_its_resource_label_names():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.multinode_grpo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["placed"] == {"trainer": ["trainer_node"], "rollout": ["rollout_node"], "reward": ["reward_node"]}
    assert result["steps"] == 2 and result["grad_norm"] > 0
