"""A reward worker process: receives samples over a pipe, scores each with the compute_score, and sends outcomes back.

RewardScorer starts it with `python -c "from rlmesh.reward.worker import main; main()" READ_FD WRITE_FD PARENT_PID`:
a fresh interpreter rather than a multiprocessing child, so the caller's __main__ (a training script, Ray's worker)
is never re-imported in it, and nothing is forked from a process with threads.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import pickle
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

# What one sample's scoring came to: ("ok", score, extras, ""), or (kind, None, {}, message) where kind is "error"
# (compute_score raised) or "invalid" (it returned NaN, inf, a string, a dict without 'score', ...).
Outcome = tuple[str, float | None, dict[str, Any], str]
# Extras that are not plain values (a sympy expression, an array) are sent back as text, cut to this length.
MAX_EXTRA_TEXT_CHARS = 500


def _plain_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    try:
        # numpy and torch scalars: keep the number, not its repr.
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            return _plain_value(value.item())
    except Exception:
        pass
    return str(value)[:MAX_EXTRA_TEXT_CHARS]


def coerce_result(result: Any) -> tuple[float, dict[str, Any]]:
    """(score, extras) from a compute_score result; ValueError when it is not a finite number or a dict with one."""
    extras: dict[str, Any] = {}
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"compute_score returned a dict without a 'score' key (keys: {sorted(map(str, result))})")
        extras = {str(key): _plain_value(value) for key, value in result.items() if key != "score"}
        result = result["score"]
    if isinstance(result, str | bytes) or not hasattr(result, "__float__"):
        raise ValueError(f"compute_score returned {type(result).__name__} {str(result)[:100]!r}, not a number")
    score = float(result)
    if not math.isfinite(score):
        raise ValueError(f"compute_score returned {score}, not a finite number")
    return score, extras


def score_one(compute_score: Any, data_source: str, solution_str: str, ground_truth: Any, extra_info: Any) -> Outcome:
    """Scores one sample; an exception becomes an 'error' outcome and an unusable result an 'invalid' one, each with
    its message."""
    try:
        result = compute_score(data_source, solution_str, ground_truth, extra_info)
    except Exception as error:
        return ("error", None, {}, f"{type(error).__name__}: {error}"[:1000])
    try:
        score, extras = coerce_result(result)
    except Exception as error:
        return ("invalid", None, {}, str(error)[:1000])
    return ("ok", score, extras, "")


def _exit_when_orphaned(parent_pid: int) -> None:
    # A worker whose controller died (SIGKILL, OOM) would otherwise wait, or spin in a hung scorer, forever.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def serve(receive: Connection, send: Connection) -> None:
    """Setup message, then samples until None or a closed pipe. Setup is (sys_path, preload_modules, pickled fn)."""
    try:
        sys_path, preload_modules, compute_score_pickle = receive.recv()
        # The controller's sys.path, so functions pickled by reference import here as they did there.
        sys.path[:] = list(dict.fromkeys([*sys_path, *sys.path]))
        for module in preload_modules:
            # Only a head start (math-verify pulls in sympy): a module that is not installed is not needed either.
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
        compute_score = pickle.loads(compute_score_pickle)
        resolve = getattr(compute_score, "resolve", None)
        if callable(resolve):
            resolve()  # a LoadedComputeScore: import the user's file now, so a broken one fails at start
    except BaseException:
        send.send(("start_failed", traceback.format_exc()))
        return
    send.send(("ready", os.getpid()))
    while True:
        try:
            message = receive.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, sample = message
        send.send((index, score_one(compute_score, *sample)))


def main() -> None:
    read_fd, write_fd, parent_pid = (int(arg) for arg in sys.argv[1:4])
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    serve(Connection(read_fd, writable=False), Connection(write_fd, readable=False))
