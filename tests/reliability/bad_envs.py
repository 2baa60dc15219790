"""Environment classes a run must refuse before any actor starts (importable by name from the configs)."""

from __future__ import annotations

from typing import Any


class UndocumentedTool:
    """Its tool has no docstring, so no JSON schema can describe it to the model."""

    def reset(self, row: Any) -> None:
        return None

    def step(self, action: str) -> tuple[None, float, bool, dict[str, Any]]:
        return None, 0.0, True, {}

    def lookup(self, key):  # type: ignore[no-untyped-def]
        return key
