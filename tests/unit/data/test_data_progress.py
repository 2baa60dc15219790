"""Data preparation shows a progress bar on a terminal, and stays quiet in logs and for a handful of rows."""

from __future__ import annotations

import sys

import pytest
from tqdm import tqdm

from rlmesh.data.sources import progress


def test_a_bar_on_a_terminal_only_and_only_for_more_than_a_few_items(monkeypatch: pytest.MonkeyPatch):
    items = list(range(10))
    assert progress(items, "rows", len(items)) is items  # pytest's stderr is no terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = progress(items, "rows", len(items))
    assert isinstance(bar, tqdm) and list(bar) == items
    assert progress(items[:3], "rows", 3) == items[:3]
