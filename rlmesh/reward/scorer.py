"""Scores a batch with a compute_score in worker processes, with a time limit per sample, so no sample stalls a batch.

Each worker process scores one sample at a time. The controller waits on the workers' pipes with the earliest
deadline as its timeout; a worker past its deadline is killed (SIGKILL: a hung sympy call ignores everything else)
and replaced by a fresh one, and its sample gets the fallback score. A sample whose scorer raises, or returns NaN,
inf or something that is not a number, gets the fallback score too. A worker that dies while scoring (killed from
outside, out of memory) is replaced and its sample scored once more; a second death costs that sample only. The
failures are counted in the metrics (reward/errors, reward/invalid, reward/timeouts) and logged once per batch and
kind, with the first such sample.

Workers are fresh interpreters (subprocess, see rlmesh.reward.worker), not forks: the caller is often a Ray actor
with threads, where fork can deadlock, and multiprocessing's spawn would re-import the caller's __main__ in each.
They need POSIX pipes passed to a child (Linux, macOS); num_workers=0 scores in-process anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing.connection
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

from rlmesh.reward.registry import ComputeScore, builtin_scorer, default_compute_score
from rlmesh.reward.worker import Outcome, score_one

logger = logging.getLogger(__name__)

FailureKind = Literal["error", "invalid", "timeout"]
_WORKER_COMMAND = "from rlmesh.reward.worker import main; main()"
# A worker whose pipe stays open after it died (a scorer forked a child that holds it) is noticed by polling this often.
_LIVENESS_POLL_S = 1.0
# Samples sent to a worker ahead of its answers: one pipe round trip per sample made scoring the default's 512 samples
# take 30-40 ms where the scoring itself takes 5 ms. Each sample's time limit still runs from when the worker starts it.
_SENT_AHEAD = 16


@dataclass(frozen=True)
class ScoreItem:
    """One response to score, with the arguments of verl's compute_score."""

    data_source: str
    solution_str: str
    ground_truth: Any
    extra_info: dict[str, Any] | None = None


@dataclass
class ScoreResult:
    """Scores in the order of the items, with what the scorers reported and what went wrong.

    extras: each key of the scorers' dict results (other than 'score'), one value per sample, None where a sample's
        result lacked it or failed.
    failures: per sample, None when scored, else 'error' (raised, or its worker died twice), 'invalid' (returned no
        usable number) or 'timeout'; that sample got the fallback score.
    metrics: reward/errors, reward/invalid, reward/timeouts (counts), reward/worker_deaths and reward/<key>/mean for
        each numeric extra.
    """

    scores: list[float]
    extras: dict[str, list[Any]] = field(default_factory=dict)
    failures: list[FailureKind | None] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class _Worker:
    """One worker process, its two pipe ends, the samples sent to it in order (it scores the first), and the first's
    deadline."""

    def __init__(self, setup: tuple[list[str], tuple[str, ...], bytes], start_timeout_s: float) -> None:
        to_child_read, to_child_write = os.pipe()
        from_child_read, from_child_write = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_COMMAND, str(to_child_read), str(from_child_write), str(os.getpid())],
                pass_fds=(to_child_read, from_child_write),
                stdin=subprocess.DEVNULL,
                # Its own session: Ctrl-C in a terminal reaches the controller, which stops the workers itself.
                start_new_session=True,
            )
        except BaseException:
            os.close(to_child_write)
            os.close(from_child_read)
            raise
        finally:
            os.close(to_child_read)
            os.close(from_child_write)
        self.to_child = Connection(to_child_write, readable=False)
        self.from_child = Connection(from_child_read, writable=False)
        self.ready = False
        self.tasks: deque[int] = deque()
        self.deadline = time.monotonic() + start_timeout_s
        with contextlib.suppress(OSError):  # a worker that died at once is reported by its closed pipe
            self.to_child.send(setup)

    def stop(self, kill: bool) -> None:
        """Kills the worker, or (kill=False) gives it 2 s to exit after being sent None."""
        if not kill:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=2)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.to_child.close()
        self.from_child.close()


def _stop_workers(workers: list[_Worker]) -> None:
    """Idle workers are asked to exit (all at once, then awaited); busy ones are killed."""
    for worker in workers:
        if not worker.tasks:
            with contextlib.suppress(OSError):
                worker.to_child.send(None)
    for worker in workers:
        worker.stop(kill=bool(worker.tasks))
    workers.clear()


class RewardScorer:
    """Scores batches with `compute_score` in `num_workers` processes, `timeout_s` per sample at most.

    A sample that raises, hangs past `timeout_s`, or returns NaN/inf/a non-number gets `fallback_score`; the batch
    always finishes, within about ceil(hung samples / num_workers) * timeout_s of the normal time. Workers start at
    the first score() and live until close() (or garbage collection, or interpreter exit); `preload_modules` are
    imported by each worker before its first sample, so that their import time does not count against a sample.

    num_workers=0 scores in this process: exceptions and bad values are still caught, but a hung scorer hangs the
    caller, since only a separate process can be killed; use it for tests and scorers you trust to return.

    compute_score must pickle: a module-level function, or a file loaded with load_compute_score(path, name).
    """

    def __init__(
        self,
        compute_score: ComputeScore = default_compute_score,
        num_workers: int = 4,
        timeout_s: float = 10.0,
        fallback_score: float = 0.0,
        *,
        preload_modules: Sequence[str] = ("math_verify",),
        start_timeout_s: float = 120.0,
        log_chars: int = 200,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 scores in this process), got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if not math.isfinite(fallback_score):
            raise ValueError(f"fallback_score must be a finite number, got {fallback_score}")
        self.compute_score = compute_score
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.fallback_score = float(fallback_score)
        self.start_timeout_s = start_timeout_s
        self.log_chars = log_chars
        self._worker_setup: tuple[list[str], tuple[str, ...], bytes] = ([], (), b"")
        if num_workers > 0:
            try:
                compute_score_pickle = pickle.dumps(compute_score)
            except Exception as error:
                raise TypeError(
                    f"compute_score {compute_score!r} cannot be sent to worker processes ({error}). Use a module-level "
                    "function, load_compute_score(path, function_name) for a file, or num_workers=0 to score in "
                    "this process (without time limits)."
                ) from error
            self._worker_setup = (list(sys.path), tuple(preload_modules), compute_score_pickle)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pending: deque[int] = deque()  # the current batch's samples not yet handed to a worker
        self._died_once: set[int] = set()
        self.worker_deaths = 0  # since construction; ScoreResult.metrics has each batch's count (no run metric yet)
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops the worker processes; a later score() starts new ones."""
        with self._lock:
            _stop_workers(self._workers)

    def score(self, items: Sequence[ScoreItem]) -> ScoreResult:
        """Scores every item (in order). It never raises for one sample's failure; it raises when the setup is wrong:
        workers that cannot start, or a data_source that default_compute_score does not know (which would otherwise
        give every sample the fallback score)."""
        if self.compute_score is default_compute_score:
            for data_source in {item.data_source for item in items}:
                builtin_scorer(data_source)
        deaths_before = self.worker_deaths
        with self._lock:
            if self.num_workers == 0:
                outcomes = [score_one(self.compute_score, *self._arguments(item)) for item in items]
            else:
                try:
                    outcomes = self._score_in_pool(items)
                except BaseException:
                    # Interrupted mid-batch (Ctrl-C, a start failure): answers still in flight would be read as the
                    # next batch's, so these workers go.
                    _stop_workers(self._workers)
                    raise
        result = self._assemble(items, outcomes)
        result.metrics["reward/worker_deaths"] = float(self.worker_deaths - deaths_before)
        return result

    @staticmethod
    def _arguments(item: ScoreItem) -> tuple[str, str, Any, dict[str, Any] | None]:
        return (item.data_source, item.solution_str, item.ground_truth, item.extra_info)

    def _new_worker(self) -> _Worker:
        return _Worker(self._worker_setup, self.start_timeout_s)

    def _score_in_pool(self, items: Sequence[ScoreItem]) -> list[Outcome]:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._new_worker())
        outcomes: list[Outcome | None] = [None] * len(items)
        pending = deque(range(len(items)))
        self._pending, self._died_once = pending, set()
        while pending or any(worker.tasks for worker in self._workers):
            for position, worker in enumerate(self._workers):
                while worker.ready and len(worker.tasks) < _SENT_AHEAD and pending:
                    index = pending[0]
                    try:
                        worker.to_child.send((index, self._arguments(items[index])))
                    except OSError:
                        # The worker died (killed from outside, out of memory, or by a sample sent before): not this
                        # sample's fault, which stays queued.
                        self._on_death(position, outcomes)
                        break
                    pending.popleft()
                    if not worker.tasks:
                        worker.deadline = time.monotonic() + self.timeout_s
                    worker.tasks.append(index)
            self._wait_and_collect(outcomes)
        finished = [outcome for outcome in outcomes if outcome is not None]
        assert len(finished) == len(items), "every sample gets an outcome before the loop ends"
        return finished

    def _wait_and_collect(self, outcomes: list[Outcome | None]) -> None:
        """Waits until a worker answers, dies or passes its deadline, and records what happened."""
        busy = [worker for worker in self._workers if worker.tasks or not worker.ready]
        if not busy:
            return
        wait_s = min(_LIVENESS_POLL_S, max(0.0, min(worker.deadline for worker in busy) - time.monotonic()))
        multiprocessing.connection.wait([worker.from_child for worker in busy], timeout=wait_s)
        for worker in busy:
            position = self._workers.index(worker)
            if worker.from_child.poll():
                if not self._read_answers(worker, outcomes):
                    self._on_death(position, outcomes)
            elif worker.process.poll() is not None:
                # It may have answered between the two checks, then died on a sample sent after: read those first.
                self._read_answers(worker, outcomes)
                self._on_death(position, outcomes)
            elif time.monotonic() >= worker.deadline:
                if not worker.ready:
                    self._raise_start_failure(f"it was not ready after {self.start_timeout_s} s")
                hung = worker.tasks[0]
                outcomes[hung] = ("timeout", None, {}, f"took longer than {self.timeout_s} s; worker killed")
                self._requeue_after(position, 1)
                self._replace(position)

    def _read_answers(self, worker: _Worker, outcomes: list[Outcome | None]) -> bool:
        """Record every message that has arrived from `worker`; False if its pipe is closed (it died)."""
        try:
            while worker.from_child.poll():
                message = worker.from_child.recv()
                if worker.ready:
                    index, outcome = message
                    assert index == worker.tasks[0], "a worker answers its samples in the order sent"
                    outcomes[worker.tasks.popleft()] = outcome
                    worker.deadline = time.monotonic() + self.timeout_s  # it starts the next one now
                elif message[0] == "ready":
                    worker.ready = True
                else:
                    self._raise_start_failure(f"it raised:\n{message[1]}")
        except (EOFError, OSError):
            return False
        return True

    def _on_death(self, position: int, outcomes: list[Outcome | None]) -> None:
        worker = self._workers[position]
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout=5)
        if not worker.ready:
            self._raise_start_failure(f"it exited with code {worker.process.returncode} (its stderr is above)")
        if worker.tasks:
            self.worker_deaths += 1
            self._requeue_after(position, 1)  # those sent behind it were not started: not theirs either
            task = worker.tasks.popleft()
            if task not in self._died_once:  # maybe not the sample's fault (killed, OOM): score it again
                self._died_once.add(task)
                self._pending.appendleft(task)
                logger.warning("a reward worker died (exit code %s); rescoring its sample", worker.process.returncode)
            else:
                why = f"the worker process died twice (exit code {worker.process.returncode}) while scoring this sample"
                outcomes[task] = ("error", None, {}, why)
        self._replace(position)

    def _requeue_after(self, position: int, first: int) -> None:
        """The samples a worker was sent from its `first` on go back to the front of the queue, in order, unscored."""
        tasks = self._workers[position].tasks
        while len(tasks) > first:
            self._pending.appendleft(tasks.pop())

    def _replace(self, position: int) -> None:
        self._workers[position].stop(kill=True)
        self._workers[position] = self._new_worker()

    def _raise_start_failure(self, why: str) -> None:
        _stop_workers(self._workers)
        raise RuntimeError(
            f"a reward worker process could not start with compute_score {self.compute_score!r}: {why}. Check that "
            "the function imports in a fresh Python process (one defined in a notebook cell does not), or use "
            "num_workers=0."
        )

    def _assemble(self, items: Sequence[ScoreItem], outcomes: list[Outcome]) -> ScoreResult:
        scores: list[float] = []
        failures: list[FailureKind | None] = []
        extra_keys = list(dict.fromkeys(key for _, _, extras, _ in outcomes for key in extras))
        extras: dict[str, list[Any]] = {key: [] for key in extra_keys}
        first_failure: dict[str, tuple[int, str]] = {}
        for index, (kind, score, sample_extras, message) in enumerate(outcomes):
            if kind == "ok":
                assert score is not None
                scores.append(score)
                failures.append(None)
            else:
                scores.append(self.fallback_score)
                failures.append(kind if kind in ("timeout", "invalid") else "error")  # type: ignore[arg-type]
                first_failure.setdefault(kind, (index, message))
            for key in extra_keys:
                extras[key].append(sample_extras.get(key))
        metrics = {
            "reward/errors": float(failures.count("error")),
            "reward/invalid": float(failures.count("invalid")),
            "reward/timeouts": float(failures.count("timeout")),
        }
        for key, values in extras.items():
            numeric = [float(v) for v in values if isinstance(v, bool | int | float)]
            if numeric:
                metrics[f"reward/{key}/mean"] = sum(numeric) / len(numeric)
        for kind, (index, message) in first_failure.items():
            self._log_failure(kind, failures.count(kind), len(items), items[index], message)  # type: ignore[arg-type]
        return ScoreResult(scores=scores, extras=extras, failures=failures, metrics=metrics)

    def _log_failure(self, kind: FailureKind, count: int, total: int, item: ScoreItem, message: str) -> None:
        solution = item.solution_str
        shown = repr(solution[: self.log_chars])
        if len(solution) > self.log_chars:
            shown += f"... ({len(solution)} chars)"
        what = {"timeout": "timed out", "invalid": "returned no usable score"}.get(kind, "failed to score")
        logger.warning(
            "reward: %d of %d samples %s and got the fallback score %s. First: data_source=%r, %s; solution=%s",
            count,
            total,
            what,
            self.fallback_score,
            item.data_source,
            message,
            shown,
        )
