"""The README's main-job command (until the training loop lands) runs and proves the mesh-to-mesh broadcast."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_mesh_demo_broadcasts_trainer_weights_to_the_rollout_mesh():
    proc = subprocess.run(
        [sys.executable, "scripts/mesh_demo.py"], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok: the rollout mesh serves the trainer's weights" in proc.stdout
