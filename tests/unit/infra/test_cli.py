"""The `rlmesh` console command, as installed: each subcommand answers --help."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "rlmesh train"),
        (["export", "--help"], "checkpoint"),
        (["plot", "--help"], "runs"),
        (["from-verl", "--help"], "--strict"),
        (["eval", "--help"], "eval"),
        (["train", "--help"], "recipe"),
    ],
)
def test_each_subcommand_of_the_installed_command_answers_help(args: list[str], expected: str):
    script = shutil.which("rlmesh", path=str(Path(sys.executable).parent))
    assert script, "the rlmesh console script is not installed: pip install -e . (scripts/setup_env.sh does)"
    done = subprocess.run([script, *(args or ["--help"])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout
