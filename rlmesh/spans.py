"""Spans of work in this process (an endpoint call, a tool call, a controller phase), kept until drained: what the
per-step Chrome / Perfetto traces are made of. Pure Python, so any layer may record."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

MAX_SPANS = 20_000  # per process between drains: one that is never drained (trainer.trace=false) keeps the newest

_spans: deque[dict[str, Any]] = deque(maxlen=MAX_SPANS)
_lock = threading.Lock()


def record(name: str, start_ns: int, end_ns: int, **args: Any) -> None:
    """A finished span: wall-clock nanoseconds (time.time_ns), comparable across the processes of one machine."""
    with _lock:
        _spans.append({"name": name, "start_ns": start_ns, "end_ns": end_ns, "args": args})


@contextlib.contextmanager
def span(name: str, **args: Any) -> Iterator[dict[str, Any]]:
    """Record the block as a span named `name`; the yielded dict takes more args while it runs. Recorded even if
    the block raises (args["error"] names the exception)."""
    extra: dict[str, Any] = dict(args)
    start = time.time_ns()
    try:
        yield extra
    except BaseException as err:
        extra["error"] = type(err).__name__
        raise
    finally:
        record(name, start, time.time_ns(), **extra)


def drain() -> list[dict[str, Any]]:
    """Every span recorded since the last drain, oldest first."""
    with _lock:
        out = list(_spans)
        _spans.clear()
    return out
