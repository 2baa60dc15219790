"""Fault injection for the reliability tests: real role classes that die, stall or compute NaN on cue, and record
what they did, so a test can count every prompt and every score.

The cues come from a JSON plan file named by the environment variable RLMESH_FAULT_PLAN, which Ray workers inherit
from the process that started Ray (tests/reliability/conftest.py sets it before the session's cluster starts; the
subprocess tests pass it in). Each class is swapped in by `_target_`, as a user's class would be. A fault fires at
most once per plan (a marker file), so the replacement of a killed actor behaves.

Plan keys (all optional):
    log                     a jsonl file: every event below is appended as one line
    kill_engine_after       the rollout actor SIGKILLs itself when its process has received this many requests
    kill_trainer_at_update  the trainer SIGKILLs itself at the start of this update (1-based)
    nan_at_updates          the trainer's loss is NaN in these updates
    stall_save_at_step      the trainer stalls in save_checkpoint of this step, after writing its files
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from rlmesh.data.batch import Batch
from rlmesh.engine.update import MicroLoss, mean_over_ranks
from rlmesh.mesh import endpoint
from rlmesh.roles.rollout.base import Sample
from rlmesh.roles.rollout.vllm import VLLMRollout
from rlmesh.roles.trainer import PolicyTrainer

PLAN_ENV = "RLMESH_FAULT_PLAN"


_cached: tuple[str, tuple[int, int], dict[str, Any]] | None = None


def plan() -> dict[str, Any]:
    """The current plan, re-read only when its file changes (the load test asks 20,000 times)."""
    global _cached
    path = os.environ.get(PLAN_ENV)
    if not path:
        return {}
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return {}
    stamp = (status.st_mtime_ns, status.st_size)
    if _cached is None or _cached[:2] != (path, stamp):
        _cached = (path, stamp, dict(json.loads(Path(path).read_text())))
    return _cached[2]


def write_plan(path: Path | None = None, **entries: Any) -> dict[str, Any]:
    """Replace the plan at `path` (default: the one Ray's workers read; tests run one after another) and clear the
    fired-once markers of the previous one."""
    path = path or Path(os.environ[PLAN_ENV])
    for marker in path.parent.glob(f"{path.name}.fired-*"):
        marker.unlink()
    path.write_text(json.dumps(entries))
    return entries


def fire_once(name: str) -> bool:
    """True the first time it is called for `name` under the current plan, in any process."""
    marker = f"{os.environ[PLAN_ENV]}.fired-{name}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def record(event: str, **fields: Any) -> None:
    log = plan().get("log")
    if log:
        with open(log, "a") as out:
            out.write(json.dumps({"event": event, "pid": os.getpid(), "time": time.time(), **fields}) + "\n")


def events(log: Path, event: str) -> list[dict[str, Any]]:
    if not log.is_file():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["event"] == event]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FaultyVLLMRollout(VLLMRollout):
    """The vLLM rollout, which records each request it answers and can die with requests in flight."""

    received = 0
    unanswered = 0

    @endpoint
    async def generate(
        self, prompt_ids: list[int], n: int, sampling: Any = None, seed: int | None = None
    ) -> list[Sample]:
        cls = FaultyVLLMRollout
        cls.received += 1
        cls.unanswered += 1
        after = plan().get("kill_engine_after")
        if after is not None and cls.received >= after and fire_once("engine"):
            record("engine_killed", in_flight=cls.unanswered)
            # Die with this request submitted and never answered. A timer that killed the process 50 ms later raced
            # the engine: once it answered tiny requests that fast, nothing was left in flight to retry.
            submitted = asyncio.ensure_future(super().generate(prompt_ids, n, sampling, seed))
            await asyncio.wait([submitted], timeout=0.01)
            die()
        samples = await super().generate(prompt_ids, n, sampling, seed)
        cls.unanswered -= 1
        record("served", seed=seed, prompt=list(prompt_ids), versions=[s.weight_version for s in samples])
        return samples


class FaultyTrainer(PolicyTrainer):
    """The policy trainer, which records every batch it trains on and the digest of its weights after each update,
    and can die, compute a NaN loss, or stall in an update or a checkpoint save, as the plan says."""

    @endpoint(collect=mean_over_ranks)
    def update(self, batch: Batch) -> dict[str, float]:
        update = self.updates + 1
        if plan().get("kill_trainer_at_update") == update and fire_once("trainer"):
            record("trainer_killed", update=update)
            die()
        record("trained", update=update, uids=list(batch["uid"]), versions=list(batch["weight_version"]))
        if plan().get("stall_update") == update:
            time.sleep(600)  # the test SIGKILLs the controller meanwhile: mid-update, whatever the machine's speed
        metrics = super().update(batch)
        record("weights", update=update, digest=self.weights_digest())
        return metrics

    def _micro_loss(self, micro: Batch, denominator: float) -> MicroLoss:
        result = super()._micro_loss(micro, denominator)
        if self.updates + 1 in plan().get("nan_at_updates", []):
            result.loss = result.loss * float("nan")
        return result

    @endpoint
    def save_checkpoint(self, path: str) -> None:
        super().save_checkpoint(path)
        step = int(Path(path).name.split("-")[1].removeprefix("step_"))  # staging folders: .tmp-step_NNNNNN-xxxx
        record("saved_files", step=step, path=path)
        if plan().get("stall_save_at_step") == step:
            time.sleep(600)  # the test SIGKILLs the controller meanwhile

    def weights_digest(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in sorted(self.engine.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()
