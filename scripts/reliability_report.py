"""Runs the reliability suite (tests/reliability) and prints one table row per scenario: the fault injected, the
outcome, the time to recover or fail, and the samples lost and duplicated.

    python scripts/reliability_report.py            # the whole suite, about 10 minutes on 2 cores
    python scripts/reliability_report.py -k load    # any pytest selection

Each test writes its row once its assertions pass (tests/reliability/conftest.py); a test that fails shows as
FAILED, with no figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="rlmesh-reliability-") as folder:
        rows_file, junit = Path(folder) / "rows.jsonl", Path(folder) / "junit.xml"
        env = {**os.environ, "RLMESH_RELIABILITY_REPORT": str(rows_file)}
        # -m "": the slow set too (the 10,000-request load test), which `make test` leaves out.
        command = [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-m", "", f"--junitxml={junit}"]
        command += sys.argv[1:]
        code = subprocess.run(command, cwd=REPO, env=env, check=False).returncode
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
        failed = _failed_tests(junit)
    print("\n| # | fault injected | outcome | time to recover / fail (s) | samples lost | samples duplicated |")
    print("|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: _order(r["scenario"])):
        figures = [("-" if row[key] is None else row[key]) for key in ("seconds", "lost", "duplicated")]
        print(f"| {row['scenario']} | {row['fault']} | {row['outcome']} | " + " | ".join(map(str, figures)) + " |")
    for test in failed:
        print(f"| ? | {test} | **FAILED** | | | |")
    print(f"\n{len(rows)} scenario rows, {len(failed)} failed tests; pytest exit code {code}")
    return code


def _order(scenario: str) -> tuple[int, str]:
    number = scenario.rstrip("abcdefghijklmnopqrstuvwxyz")  # "8b" sorts after "8"
    return (int(number), scenario) if number.isdigit() else (99, scenario)


def _failed_tests(junit: Path) -> list[str]:
    if not junit.exists():
        return []
    failed = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
