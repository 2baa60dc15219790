"""RewardScorer: raising, hanging, crashing and NaN scorers get the fallback score, are counted, never stall a batch."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlmesh.reward import (
    LoadedComputeScore,
    RewardScorer,
    ScoreItem,
    UnknownDataSourceError,
    default_compute_score,
    load_compute_score,
)

TEST_REWARD_FILE = Path(__file__).with_name("reward_fns_for_tests.py")
TIMEOUT_S = 1.0
# Worker restarts are fresh interpreters (~0.1 s each, more on a loaded 2-core CI machine).
RESTART_ALLOWANCE_S = 4.0
# A regression that lets a hung scorer stall the batch fails here rather than at the suite's 300 s limit.
pytestmark = pytest.mark.timeout(60)


def item(solution: str, ground_truth: str = "7", **extra_info) -> ScoreItem:
    return ScoreItem("my_source", solution, ground_truth, extra_info or None)


@pytest.fixture(scope="module")
def misbehaving_pool() -> Iterator[RewardScorer]:
    scorer = RewardScorer(
        load_compute_score(TEST_REWARD_FILE, "misbehaving_score"),
        num_workers=2,
        timeout_s=TIMEOUT_S,
        fallback_score=-1.0,
        preload_modules=(),
    )
    yield scorer
    scorer.close()


def test_every_failure_gets_the_fallback_and_the_rest_are_scored(misbehaving_pool, caplog):
    solutions = ["7", "raise", "nan", "inf", "text", "no-score", "hang", "8", "7"]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rlmesh.reward.scorer"):
        result = misbehaving_pool.score([item(solution) for solution in solutions])
    elapsed = time.monotonic() - started

    assert result.scores == [1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 0.0, 1.0]
    assert result.failures == [None, "error", "invalid", "invalid", "invalid", "invalid", "timeout", None, None]
    assert result.metrics["reward/errors"] == 1
    assert result.metrics["reward/invalid"] == 4
    assert result.metrics["reward/timeouts"] == 1
    assert elapsed < TIMEOUT_S + RESTART_ALLOWANCE_S

    # Logged once per kind, with the first such sample and its data_source.
    messages = [record.getMessage() for record in caplog.records]
    errors = [message for message in messages if "failed to score" in message]
    invalid = [message for message in messages if "returned no usable score" in message]
    timeouts = [message for message in messages if "timed out" in message]
    assert len(errors) == 1 and len(invalid) == 1 and len(timeouts) == 1
    assert "1 of 9" in errors[0] and "RuntimeError: scorer bug" in errors[0] and "'my_source'" in errors[0]
    assert "4 of 9" in invalid[0] and "returned nan, not a finite number" in invalid[0] and "'nan'" in invalid[0]
    assert "'hang'" in timeouts[0]


def test_hung_workers_are_killed_and_the_batch_finishes(misbehaving_pool, tmp_path):
    pid_files = [tmp_path / f"hung_{index}.pid" for index in range(3)]
    items = [item("hang" if index % 2 else "spin", pid_file=str(path)) for index, path in enumerate(pid_files)]
    items += [item("7") for _ in range(4)]
    started = time.monotonic()
    result = misbehaving_pool.score(items)
    elapsed = time.monotonic() - started

    assert result.failures == ["timeout"] * 3 + [None] * 4
    assert result.scores == [-1.0] * 3 + [1.0] * 4
    # Three hung samples on two workers: two rounds of the time limit, not three and not forever.
    assert 2 * TIMEOUT_S <= elapsed < 2 * TIMEOUT_S + RESTART_ALLOWANCE_S
    for path in pid_files:
        with pytest.raises(ProcessLookupError):
            os.kill(int(path.read_text()), 0)


def test_samples_sent_ahead_to_a_worker_that_hangs_or_dies_are_scored_by_its_replacement(tmp_path):
    # One worker is sent several samples before it answers: those behind a hung or crashing one were never started,
    # so they are neither timeouts nor errors: each time limit runs from when its own sample started.
    marker = tmp_path / "crashed-once"
    solutions = ["7", "hang", "7", "8", "crash-once", "7", "raise", "slow", "slow", "8"]
    with RewardScorer(
        load_compute_score(TEST_REWARD_FILE, "misbehaving_score"),
        num_workers=1,
        timeout_s=TIMEOUT_S,
        fallback_score=-1.0,
        preload_modules=(),
    ) as scorer:
        result = scorer.score([item(s, marker=str(marker)) if s == "crash-once" else item(s) for s in solutions])
    # two 0.6 s samples in a row fit a 1 s limit each only if each limit starts with its own sample, not when sent
    assert result.failures == [None, "timeout", None, None, None, None, "error", None, None, None]
    assert result.scores == [1.0, -1.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0]
    assert result.metrics["reward/worker_deaths"] == 1  # the crash; the hung worker was killed at its limit


def test_a_sample_that_crashes_its_worker_twice_is_an_error_and_the_workers_are_replaced(misbehaving_pool):
    result = misbehaving_pool.score([item("crash"), item("7"), item("crash"), item("7"), item("7")])
    assert result.failures == ["error", None, "error", None, None]
    assert result.scores == [-1.0, 1.0, -1.0, 1.0, 1.0]
    assert result.metrics["reward/errors"] == 2
    assert result.metrics["reward/worker_deaths"] == 4  # each crashing sample is scored twice before giving up


def test_a_worker_killed_from_outside_mid_sample_costs_nothing(misbehaving_pool, tmp_path):
    marker = tmp_path / "crashed-once"
    result = misbehaving_pool.score([item("7"), item("crash-once", marker=str(marker)), item("7"), item("8")])
    assert marker.exists()  # the first attempt's worker did die
    assert result.failures == [None, None, None, None]
    assert result.scores == [1.0, 0.0, 1.0, 0.0]  # the rescored sample got its real score
    assert result.metrics["reward/worker_deaths"] == 1 and result.metrics["reward/errors"] == 0


def test_an_empty_batch_and_a_pool_that_is_reused(misbehaving_pool):
    assert misbehaving_pool.score([]).scores == []
    assert misbehaving_pool.score([item("7")] * 50).scores == [1.0] * 50


def test_dict_extras_become_per_sample_values_and_mean_metrics():
    with RewardScorer(load_compute_score(TEST_REWARD_FILE), num_workers=1, preload_modules=()) as scorer:
        result = scorer.score([item("7"), item("8"), item("77")])
    assert result.scores == [1.0, 0.0, 0.0]
    assert result.extras == {"acc": [True, False, False], "length": [1, 1, 2], "note": ["plain text"] * 3}
    assert result.metrics["reward/acc/mean"] == pytest.approx(1 / 3)
    assert result.metrics["reward/length/mean"] == pytest.approx(4 / 3)
    assert "reward/note/mean" not in result.metrics  # text is kept per sample, not averaged


def test_builtin_scorers_in_worker_processes():
    items = [
        ScoreItem("openai/gsm8k", "#### 72", "72"),
        ScoreItem("lighteval/MATH", "\\boxed{\\frac{1}{2}}", "0.5"),
        ScoreItem("arithmetic", "68", "68"),
        ScoreItem("countdown", "<answer>3*3</answer>", {"target": 9, "numbers": [3, 3]}),
        ScoreItem("digit_sort", "123", "124"),
    ]
    with RewardScorer(num_workers=1, timeout_s=30.0) as scorer:
        result = scorer.score(items)
    assert result.scores == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert result.extras["pred"] == ["72", "\\frac{1}{2}", "68", "3*3", "123"]
    assert result.metrics["reward/acc/mean"] == pytest.approx(0.8)


def test_in_process_mode_still_catches_errors_and_bad_values():
    scorer = RewardScorer(load_compute_score(TEST_REWARD_FILE, "misbehaving_score"), num_workers=0)
    result = scorer.score([item("7"), item("raise"), item("nan"), item("text")])
    assert result.scores == [1.0, 0.0, 0.0, 0.0]
    assert result.metrics == {
        "reward/errors": 1.0,
        "reward/invalid": 2.0,
        "reward/timeouts": 0.0,
        "reward/worker_deaths": 0.0,
    }


def test_unknown_data_source_fails_the_batch_before_scoring():
    scorer = RewardScorer(default_compute_score, num_workers=0)
    with pytest.raises(UnknownDataSourceError, match="typo/gsm8k"):
        scorer.score([ScoreItem("openai/gsm8k", "#### 1", "1"), ScoreItem("typo/gsm8k", "#### 1", "1")])


def test_a_function_that_cannot_reach_workers_is_refused_at_construction():
    with pytest.raises(TypeError, match="cannot be sent to worker processes"):
        RewardScorer(lambda data_source, solution_str, ground_truth, extra_info=None: 1.0, num_workers=1)


def test_workers_that_cannot_start_raise_instead_of_hanging(tmp_path):
    # Loaded without checking, then the file is gone: the worker fails at start-up and says why.
    compute_score = LoadedComputeScore(str(tmp_path / "deleted_reward.py"))
    scorer = RewardScorer(compute_score, num_workers=1, preload_modules=())
    with pytest.raises(RuntimeError, match="could not start") as raised:
        scorer.score([item("7")])
    assert "deleted_reward.py" in str(raised.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_workers": -1}, "num_workers"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"fallback_score": float("nan")}, "fallback"),
    ],
)
def test_bad_settings_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        RewardScorer(default_compute_score, **arguments)


class Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise Interrupted


def test_a_batch_interrupted_midway_leaves_the_scorer_usable():
    scorer = RewardScorer(
        load_compute_score(TEST_REWARD_FILE, "misbehaving_score"), num_workers=1, timeout_s=30, preload_modules=()
    )
    previous_handler = signal.signal(signal.SIGUSR1, _raise_interrupted)
    try:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        with pytest.raises(Interrupted):
            scorer.score([item("hang")])
    finally:
        signal.signal(signal.SIGUSR1, previous_handler)
    # The hung sample from the interrupted batch must not answer for this one.
    started = time.monotonic()
    assert scorer.score([item("7"), item("8")]).scores == [1.0, 0.0]
    assert time.monotonic() - started < RESTART_ALLOWANCE_S
    scorer.close()


def test_close_stops_the_workers():
    scorer = RewardScorer(load_compute_score(TEST_REWARD_FILE), num_workers=2, preload_modules=())
    scorer.score([item("7")])
    processes = [worker.process for worker in scorer._workers]
    assert all(process.poll() is None for process in processes)
    scorer.close()
    assert all(process.poll() is not None for process in processes)


CONTROLLER_THAT_DIES = """
import sys
from rlmesh.reward import RewardScorer, ScoreItem, load_compute_score
scorer = RewardScorer(load_compute_score(sys.argv[1], "misbehaving_score"), num_workers=1, timeout_s=600,
                      preload_modules=())
scorer.score([ScoreItem("my_source", "hang", "7", {"pid_file": sys.argv[2]})])
"""


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_worker_whose_controller_died_exits_even_while_hung(tmp_path):
    pid_file = tmp_path / "worker.pid"
    controller = subprocess.Popen([sys.executable, "-c", CONTROLLER_THAT_DIES, str(TEST_REWARD_FILE), str(pid_file)])
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        worker_pid = int(pid_file.read_text())
        assert _is_running(worker_pid)
    finally:
        controller.kill()  # SIGKILL: no finalizer runs, as when a Ray actor is killed
        controller.wait()
    deadline = time.monotonic() + 10
    while _is_running(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not _is_running(worker_pid)
    finally:
        if _is_running(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)  # don't leave a sleeping orphan behind a failure
