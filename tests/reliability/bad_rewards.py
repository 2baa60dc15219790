"""A user's reward file (verl's compute_score signature) that misbehaves on some samples, loaded through
roles.reward.custom_reward_function like any user's file. Each call is appended to `log` (a reward_kwargs entry), so
the tests can count exactly what each step should report.

The misbehaviour of a sample follows its ground truth (a 2-digit sum, 0-198), so about a third of the samples of
every step misbehave and the rest are scored by exact match:

    truth % 16 == 1   raises                 -> reward/errors
    truth % 16 == 2   hangs                  -> reward/timeouts
    truth % 16 == 3   returns NaN            -> reward/invalid
    truth % 16 == 4   returns a string       -> reward/invalid
    truth % 16 == 5   is slow (SLOW_S), then scores correctly

With `kill_parent_once` (a marker file path), the first call SIGKILLs the reward actor that owns this worker: the
actor dies mid-scoring, for real.
"""

from __future__ import annotations

import json
import os
import signal
import time

SLOW_S = 0.3  # under the tests' 0.6 s time limit: slow, not hung
BEHAVIOURS = {1: "raise", 2: "hang", 3: "nan", 4: "string", 5: "slow"}


def behaviour(ground_truth: object) -> str:
    return BEHAVIOURS.get(int(str(ground_truth)) % 16, "ok")


def compute_score(data_source, solution_str, ground_truth, extra_info=None, log=None, kill_parent_once=None):
    kind = behaviour(ground_truth)
    if log:
        with open(log, "a") as out:
            out.write(json.dumps({"kind": kind, "truth": str(ground_truth), "actor": os.getppid()}) + "\n")
    if kill_parent_once:
        try:
            os.close(os.open(kill_parent_once, os.O_CREAT | os.O_EXCL))
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(60)  # orphaned: the worker notices and exits
        except FileExistsError:
            pass
    if kind == "raise":
        raise ValueError(f"this reward function cannot score {solution_str!r}")
    if kind == "hang":
        time.sleep(3600)
    if kind == "nan":
        return float("nan")
    if kind == "string":
        return "1.0"
    if kind == "slow":
        time.sleep(SLOW_S)
    return 1.0 if solution_str.strip() == str(ground_truth) else 0.0
