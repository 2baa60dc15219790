"""Reliability tests: each fault injected for real on real Ray and real vLLM (CPU).

The fault plan file is named here, at collection, before the session's Ray cluster starts: Ray workers inherit the
environment of the process that starts Ray, and read the plan from it (tests/reliability/faults.py).
Each scenario also reports one row (fault, outcome, seconds to recover or fail, samples lost and duplicated) to
the file named by RLMESH_RELIABILITY_REPORT, which scripts/reliability_report.py prints as a table.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.faults import PLAN_ENV

os.environ.setdefault(PLAN_ENV, str(Path(tempfile.mkdtemp(prefix="rlmesh-faults-")) / "plan.json"))
REPORT_ENV = "RLMESH_RELIABILITY_REPORT"

Report = Callable[..., None]


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    """report(scenario, fault, outcome, seconds=None, lost=None, duplicated=None): one row of the reliability table,
    written by a test once its assertions have passed. A figure the test did not measure stays None (printed as -)."""

    def add(
        scenario: str,
        fault: str,
        outcome: str,
        seconds: float | None = None,
        lost: int | None = None,
        duplicated: int | None = None,
    ) -> None:
        path = os.environ.get(REPORT_ENV)
        if path:
            seconds = None if seconds is None else round(seconds, 1)
            row = dict(scenario=scenario, fault=fault, outcome=outcome, seconds=seconds, lost=lost)
            row |= {"duplicated": duplicated, "test": request.node.nodeid}
            with open(path, "a") as out:
                out.write(json.dumps(row) + "\n")

    return add
