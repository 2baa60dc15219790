"""Reward functions for the scorer tests, loaded by file path the way a user's verl reward file is."""

import os
import signal
import time


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """A verl-style user reward: exact match, as a dict whose extra keys become metrics."""
    correct = solution_str.strip() == str(ground_truth)
    return {"score": 1.0 if correct else 0.0, "acc": correct, "length": len(solution_str), "note": "plain text"}


def scaled_score(data_source, solution_str, ground_truth, extra_info=None, factor=1.0):
    """A float reward with an option, to check that load_compute_score binds keyword arguments."""
    return factor * float(solution_str.strip() == str(ground_truth))


def misbehaving_score(data_source, solution_str, ground_truth, extra_info=None):
    """Misbehaves as the response asks ('raise', 'hang', 'spin', 'crash', 'crash-once', 'nan', 'inf', 'text',
    'no-score', 'slow': 0.6 s, then exact match); any other response is scored by exact match."""
    if solution_str == "slow":
        time.sleep(0.6)
        return 0.0
    if solution_str == "raise":
        raise RuntimeError("scorer bug")
    if solution_str in ("hang", "spin"):
        if extra_info and "pid_file" in extra_info:
            with open(extra_info["pid_file"], "w") as pid_file:
                pid_file.write(str(os.getpid()))
        # A hung worker must be killed for real: SIGTERM alone would not stop this one.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if solution_str == "spin":
            while True:
                pass
        time.sleep(3600)
    if solution_str == "crash":
        os._exit(3)
    if solution_str == "crash-once":  # a worker killed from outside while scoring: the retry finds the marker
        try:
            os.close(os.open(extra_info["marker"], os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return 0.0
        os.kill(os.getpid(), signal.SIGKILL)
    if solution_str == "nan":
        return float("nan")
    if solution_str == "inf":
        return {"score": float("inf")}
    if solution_str == "text":
        return "1.0"
    if solution_str == "no-score":
        return {"acc": True}
    return float(solution_str == str(ground_truth))
