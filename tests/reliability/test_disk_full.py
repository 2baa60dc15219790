"""A disk that fills up during a checkpoint save: a small tmpfs holds the run's output folder for real."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlmesh.checkpoint import CheckpointManager
from rlmesh.recovery import RunFailed
from rlmesh.train import run
from tests.conftest import compose_config
from tests.reliability.conftest import Report
from tests.reliability.test_run_faults import SMALL, assert_loadable

pytestmark = pytest.mark.usefixtures("ray_cluster")
# One checkpoint of the tiny model is about 13 MB (4.2 MB of weights, 8.4 MB of AdamW state): 24 MB hold one, not two.
DISK_MB = 24


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"needs permission to mount a {DISK_MB} MB tmpfs (root on this machine kind): {done.stderr!r}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_is_named_and_the_previous_checkpoint_loads(small_disk: Path, report: Report):
    out = small_disk / "run"
    common = [*SMALL, "trainer.total_steps=3", "trainer.save_freq=1", "trainer.keep_last=2"]
    started = time.monotonic()
    with pytest.raises(RunFailed) as failure:
        run(compose_config(*common, f"trainer.output_dir={out}"))
    message = str(failure.value)
    assert "step 2: the checkpoint could not be written because the disk is full" in message
    assert "MB free under" in message or "No space left on device" in message
    assert "the previous checkpoint" in message and "step_000001 is intact" in message
    assert "trainer.resume=auto" in message
    checkpoints = CheckpointManager(out / "checkpoints", keep_last=2)
    assert checkpoints.latest() == out / "checkpoints" / "step_000001"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]  # the partial one is gone
    assert_loadable(out / "checkpoints" / "step_000001")

    report(
        "10",
        f"disk full ({DISK_MB} MB tmpfs) during the checkpoint save of step 2",
        "run stopped: 'the disk is full'; step 1's checkpoint intact, and it loads",
        time.monotonic() - started,
    )
