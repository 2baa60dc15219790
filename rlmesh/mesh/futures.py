"""Futures returned by mesh calls: block with .result(), or await them; several can be waited on together."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError

R = TypeVar("R")


class ActorDiedError(RuntimeError):
    """An actor of a mesh died while running a call. The message names the mesh, the coordinates and the method."""


class MeshFuture(Generic[R]):
    """The pending result of a mesh call."""

    def result(self, timeout: float | None = None) -> R:
        raise NotImplementedError

    def done(self) -> bool:
        raise NotImplementedError

    def __await__(self) -> Generator[Any, None, R]:
        raise NotImplementedError

    def get(self, timeout: float | None = None) -> R:
        """Alias of result(), for code used to ray.get."""
        return self.result(timeout)


class GatheredFuture(MeshFuture[R]):
    """Results of calls issued to several actors at once (`all`, `shard`, `call_one`), gathered by `collect`.

    Only the refs at `collect_from` feed the result; the others (tp/pp replicas) are awaited for completion.
    """

    def __init__(
        self,
        refs: list[ray.ObjectRef],
        collect: Callable[[list[Any]], R],
        describe: Callable[[int], str],
        method: str,
        collect_from: Sequence[int] | None = None,
    ) -> None:
        self._refs = refs
        self._collect = collect
        self._describe = describe
        self._method = method
        self._collect_from = list(range(len(refs))) if collect_from is None else list(collect_from)
        self._value: Any = _UNSET

    @property
    def refs(self) -> list[ray.ObjectRef]:
        return self._refs

    def done(self) -> bool:
        if self._value is not _UNSET:
            return True
        ready, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        return len(ready) == len(self._refs)

    def result(self, timeout: float | None = None) -> R:
        if self._value is _UNSET:
            try:
                values = ray.get(self._refs, timeout=timeout)
            except GetTimeoutError:
                ready, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
                pending = [self._describe(i) for i, r in enumerate(self._refs) if r not in ready]
                raise TimeoutError(
                    f"'{self._method}' did not finish within {timeout}s on {', '.join(pending)}"
                ) from None
            except RayActorError:
                raise self._death() from None
            self._value = self._collect([values[i] for i in self._collect_from])
        return self._value

    def __await__(self) -> Generator[Any, None, R]:
        return self._await().__await__()

    async def _await(self) -> R:
        if self._value is _UNSET:
            try:
                values = await asyncio.gather(*self._refs)
            except RayActorError:
                raise self._death() from None
            self._value = self._collect([values[i] for i in self._collect_from])
        return self._value

    def _death(self) -> ActorDiedError:
        dead = []
        for i, ref in enumerate(self._refs):
            try:
                ray.get(ref, timeout=0.5)
            except RayActorError as err:
                dead.append(f"{self._describe(i)} ({type(err).__name__}: {str(err).splitlines()[0]})")
            except Exception:
                pass
        return ActorDiedError(f"'{self._method}' failed: actor(s) died: {'; '.join(dead)}")


class RoutedFuture(MeshFuture[R]):
    """The result of a routed (`choose`) call.

    The waiting thread reads the value straight from Ray, with no hand-off through a callback thread, and tells
    the mesh the attempt finished (`settled`, with its error or None; wait_all settles a batch of the mesh's calls
    in one call, so their slots are freed before queued calls go). If the actor died, the waiter asks the mesh
    to re-issue the call on a live actor (`retry`), which raises ActorDiedError when the call may not be retried.
    """

    def __init__(
        self,
        retry: Callable[[RoutedFuture[R], BaseException], None],
        settled: Callable[[list[tuple[ray.ObjectRef, BaseException | None]]], None] = lambda finished: None,
    ) -> None:
        # The ObjectRef of this try: _Issued when the call went out before anyone could wait on it (no Condition to
        # build: 0.06 ms of a pipelined call, by cProfile), else a Future set when the mesh issues it (queued,
        # retried) or fails it.
        self._attempt: Any = None
        self._retry = retry
        self._settled = settled
        self._lock = threading.Lock()
        self._value: Any = _UNSET
        self._finish_attempt: Callable[[Any], Any] | None = None

    # called by the mesh
    def issued(self, ref: ray.ObjectRef, finish: Callable[[Any], Any] | None = None) -> None:
        """This attempt's result will be `finish(value of ref)` (an in_store call wraps its head with its body)."""
        self._finish_attempt = finish
        if self._attempt is None:
            self._attempt = _Issued(ref)
        else:
            self._attempt.set_result(ref)

    def queued(self) -> None:
        """The call waits in the mesh's queue (called under the mesh's lock, before anything can issue it)."""
        if self._attempt is None:
            self._attempt = concurrent.futures.Future()

    def _finish(self, value: Any) -> None:
        self._value = value if self._finish_attempt is None else self._finish_attempt(value)

    def failed(self, err: BaseException) -> None:
        self.queued()  # a call failed at submission was never issued: it needs a Future to carry the error
        if not self._attempt.done():
            self._attempt.set_exception(err)

    def new_attempt(self) -> None:
        self._attempt = concurrent.futures.Future()

    def done(self) -> bool:
        if self._value is not _UNSET:
            return True
        if not self._attempt.done():
            return False
        if self._attempt.exception() is not None:
            return True
        ready, _ = ray.wait([self._attempt.result()], timeout=0)
        return bool(ready)

    def result(self, timeout: float | None = None) -> R:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._value is _UNSET:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            attempt = self._attempt
            try:
                ref = attempt.result(remaining)
            except concurrent.futures.TimeoutError:
                raise TimeoutError(f"routed call did not finish within {timeout}s") from None
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                value = ray.get(ref, timeout=remaining)
            except GetTimeoutError:
                raise TimeoutError(f"routed call did not finish within {timeout}s") from None
            except BaseException as err:
                self._attempt_failed(attempt, ref, err)
            else:
                self._settled([(ref, None)])
                self._finish(value)
        return self._value

    def __await__(self) -> Generator[Any, None, R]:
        return self._await().__await__()

    async def _await(self) -> R:
        while self._value is _UNSET:
            attempt = self._attempt
            ref = attempt.result() if isinstance(attempt, _Issued) else await asyncio.wrap_future(attempt)
            try:
                value = await ref
            except asyncio.CancelledError:
                raise  # the call still runs: the tracker retires it
            except BaseException as err:
                self._attempt_failed(attempt, ref, err)
            else:
                self._settled([(ref, None)])
                self._finish(value)
        return self._value

    def _attempt_failed(self, attempt: Any, ref: ray.ObjectRef, err: BaseException) -> None:
        """The attempt raised: tell the mesh, then re-issue it if its actor died, else raise the call's error."""
        self._settled([(ref, err)])
        if not isinstance(err, RayActorError):
            raise err
        with self._lock:
            if self._attempt is attempt:  # another waiter may have re-issued it already
                self._retry(self, err)


def wait_all(futures: Sequence[MeshFuture[Any]], timeout: float | None = None) -> list[Any]:
    """Block until every future is done and return their results in order; the timeout covers all of them."""
    deadline = None if timeout is None else time.monotonic() + timeout
    _prefetch_routed(futures, deadline)
    out = []
    for fut in futures:
        out.append(fut.result(_left(deadline)))
    return out


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _prefetch_routed(futures: Sequence[MeshFuture[Any]], deadline: float | None) -> None:
    """Fetch the values of routed calls in batches, in the order they finish: one ray.wait and one ray.get per
    batch instead of one per future (3,000 calls: a few hundred calls into Ray, not 3,000). Each value settles its
    call at once, so calls queued behind an in-flight cap go as soon as any actor frees, not when the calls before
    them in the list have finished. Any failure is left for the per-future path, which retries."""
    routed = [f for f in futures if isinstance(f, RoutedFuture) and f._value is _UNSET]
    if len(routed) < 2:
        return
    queued = deque(f for f in routed if not f._attempt.done())
    issued = {f._attempt.result(): f for f in routed if f._attempt.done() and f._attempt.exception() is None}
    while issued or queued:
        while queued and queued[0]._attempt.done():  # the mesh's queue is FIFO: the front goes first
            fut = queued.popleft()
            if fut._attempt.exception() is None:
                issued[fut._attempt.result()] = fut
        if not issued:
            concurrent.futures.wait([queued[0]._attempt], timeout=_left(deadline))
            if not queued[0]._attempt.done():
                return
            continue
        refs = list(issued)
        if queued:  # wait for the first to finish; with nothing queued, all of them at once
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            if not ready:
                ready, _ = ray.wait(refs, num_returns=1, timeout=_left(deadline), fetch_local=False)
        else:
            ready = refs
        if not ready:
            return
        try:
            values = ray.get(ready, timeout=_left(deadline))
        except Exception:
            return
        # Each mesh settles the batch's calls together (bound methods of one mesh compare equal, so they key them).
        meshes: dict[Callable[..., None], list[tuple[ray.ObjectRef, BaseException | None]]] = {}
        for ref in ready:
            meshes.setdefault(issued[ref]._settled, []).append((ref, None))
        for settle, finished in meshes.items():
            settle(finished)
        for ref, value in zip(ready, values, strict=True):
            issued.pop(ref)._finish(value)


class _Issued:
    """An attempt issued at once: the done part of concurrent.futures.Future's interface."""

    __slots__ = ("_ref",)

    def __init__(self, ref: ray.ObjectRef) -> None:
        self._ref = ref

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> ray.ObjectRef:
        return self._ref

    def exception(self, timeout: float | None = None) -> None:
        return None


class _Unset:
    pass


_UNSET = _Unset()


@dataclass
class Settled:
    """How a set of calls ended: by index, the values of those that returned and the errors of those that raised,
    and the indices of those that had not finished when the wait ended."""

    values: dict[int, Any]
    errors: dict[int, BaseException]
    unfinished: list[int]
    waited_s: float

    @property
    def ok(self) -> bool:
        return not self.errors and not self.unfinished

    def problems(self, who: Sequence[str]) -> list[str]:
        """One line per call that died, failed or did not finish, in call order, each naming `who[i]`."""
        lines = []
        for i, member in enumerate(who):
            error = self.errors.get(i)
            if i in self.unfinished:
                lines.append(f"{member} did not finish (waited {self.waited_s:.0f}s)")
            elif isinstance(error, RayActorError):
                lines.append(f"{member} died ({last_line(error)})")
            elif error is not None:
                lines.append(f"{member} failed: {last_line(error)}")
        return lines


def settle(
    refs: Sequence[ray.ObjectRef],
    timeout_s: float,
    *,
    on_first_failure: Callable[[], Any] | None = None,
    after_failure_s: float | None = None,
) -> Settled:
    """Wait for every ref up to `timeout_s`, and at most `after_failure_s` more once one has failed (calls that
    wait on the failed one then end by their own timeouts), without raising: the outcome of each is in the result.
    `on_first_failure` runs once, as soon as one fails (to wake calls that would otherwise wait for it)."""
    started = time.monotonic()
    deadline = started + timeout_s
    values: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        for ref in ready:
            try:
                values[index[ref]] = ray.get(ref)
                continue
            except Exception as err:
                errors[index[ref]] = err
            if after_failure_s is not None:
                deadline = min(deadline, time.monotonic() + after_failure_s)
                after_failure_s = None
            if on_first_failure is not None:
                on_first_failure()
                on_first_failure = None
    unfinished = sorted(index[ref] for ref in pending)
    return Settled(values, errors, unfinished, time.monotonic() - started)


# Trailing lines that point elsewhere instead of saying what failed (pydantic ends every error with one).
_POINTERS = ("For further information visit",)


def last_line(err: BaseException) -> str:
    """The last non-empty line of an error (Ray's carry the remote traceback before it), at most 400 characters;
    a trailing pointer to docs (pydantic's "For further information visit ...") gives way to the line before it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    while len(lines) > 1 and lines[-1].startswith(_POINTERS):
        lines.pop()
    return lines[-1][:400] if lines else type(err).__name__
