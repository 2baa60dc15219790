"""Routed (`choose`) calls of one mesh: picking an actor, the in-flight cap's queue, retries on a live actor, waiting
for an automatic restart, and the tracker thread that retires calls nobody is waiting on."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import ray
from ray.exceptions import ActorDiedError as RayActorDiedError

from rlmesh.mesh.endpoint import EndpointSpec
from rlmesh.mesh.futures import ActorDiedError, RoutedFuture, last_line
from rlmesh.mesh.routing import Load, Router
from rlmesh.mesh.stored import needs_resolving, stored_from

HOST_CALL = "_rlmesh_call"  # the host method that fetches StoredRows arguments and keeps in_store results


def through_host(in_store: bool, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """Whether a call goes through the actor's _rlmesh_call instead of straight to its endpoint."""
    return in_store or needs_resolving(args, kwargs)


def issue(
    method: Any,
    endpoint: str,
    host: bool,
    in_store: bool,
    summary: Callable[[Any], Any] | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[Any, Any]:
    """Issue one actor call; `method` is the actor's `endpoint`, or with `host` its _rlmesh_call. Returns the ref of
    the result and, with in_store, the ref of the value kept in the store (else None)."""
    if not host:
        return method.remote(*args, **kwargs), None
    if in_store:
        head, body = method.options(num_returns=2).remote(endpoint, True, summary, *args, **kwargs)
        return head, body
    return method.remote(endpoint, False, None, *args, **kwargs), None


def pull_cap(endpoints: Iterable[EndpointSpec], actor_options: Mapping[str, Any]) -> int | None:
    """The default in-flight cap: an actor that runs calls one (or max_concurrency) at a time gets one more, the
    next call at hand, and the rest wait in the controller for the first actor that frees (pull, not push: a call
    pushed behind a long one waits for it even when another actor is idle). Async actors run many calls at once, so
    they are not capped."""
    if any(spec.is_async for spec in endpoints):
        return None
    return int(actor_options.get("max_concurrency", 1)) + 1


log = logging.getLogger(__name__)

# Pull hands an actor its next call only once the controller has seen one finish. With calls shorter than that
# hand-off (0.4-0.9 ms a call here), an actor holding max_concurrency + 1 calls runs both and idles: 1,900-2,300
# pipelined no-op calls/s against raw Ray's 4,400-5,100 (8 actors, 1,000 calls, 5 repeats, side by side in one
# script; bench_mesh's pull row measures the same). Under "auto" each actor may then hold more,
# up to this many beyond the cap: twice as many plus one each time a batch of finishes leaves an actor with nothing
# while calls wait, half as many after four batches in a row that leave none dry. Floods of sub-millisecond calls go
# deep (2,950-3,150 calls/s); calls longer than a hand-off almost never run an actor dry and keep plain pull, whose
# routing they need (the same makespan as a fixed cap of 2 on 300 lognormal calls of mean 20 ms, in that script).
MAX_EXTRA_PER_ACTOR = 32

_MAX_CHOOSE_ATTEMPTS = 3
# How often the tracker looks for finished calls that no waiter has retired yet: with a queue behind the in-flight
# cap, and without one. Waiters retire their own calls at once, so the tracker only bounds how stale counts get.
_TRACK_QUEUED_S = 0.005
_TRACK_IDLE_S = 0.05


class ActorTable:
    """State shared by a mesh and all its sub-meshes: handles, liveness and in-flight counts per position."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles
        self.alive = [True] * len(handles)
        self.all_alive = True  # the routing fast path skips liveness filtering while nothing has died
        self.in_flight = [0] * len(handles)
        self.generation = [0] * len(handles)  # bumped when the actor at a position is replaced
        self.lock = threading.Lock()
        self.methods: dict[str, list[Any]] = {}
        self.restart_lock = threading.Lock()  # one restart at a time: two would each replace the same dead actor
        self.faults = {"retried_calls": 0, "restarted_actors": 0}
        self.span_drains: dict[int, tuple[int, Any]] = {}  # position -> (generation, ref of its pending span drain)

    def method(self, name: str, pos: int) -> Any:
        cached = self.methods.get(name)
        if cached is None:
            cached = self.methods[name] = [getattr(h, name) for h in self.handles]
        return cached[pos]


@dataclass
class RoutedCall:
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    key: Hashable | None
    retry: bool
    candidates: Sequence[int]
    future: RoutedFuture[Any]
    in_store: bool = False  # the result stays in the object store (Endpoint.in_store)
    summary: Callable[[Any], Any] | None = None
    attempts: int = 0
    position: int = -1  # the actor running the current attempt
    generation: int = 0  # of that position when it was issued: a replaced actor's late failures are not the new one's


class RoutedCalls:
    """The routed calls of one root mesh. `table` gives the mesh's current actor table (a restart replaces
    handles in it), `describe` names a position, `restart` replaces dead actors (ActorMesh.restart_dead)."""

    def __init__(
        self,
        name: str,
        router: Router,
        cap: int | None,
        auto_restart: bool,
        *,
        table: Callable[[], ActorTable],
        describe: Callable[[int], str],
        restart: Callable[[], list[int]],
        adaptive: bool = False,
    ) -> None:
        """`adaptive` (max_in_flight_per_actor="auto"): actors whose calls outpace the hand-off hold more of them."""
        self._name, self._router, self._cap, self._auto_restart = name, router, cap, auto_restart
        self._table, self._describe, self._restart = table, describe, restart
        self._queue: deque[RoutedCall] = deque()
        # Issued calls not yet retired, by result ref: (position, generation). Retiring one (its waiter got the
        # result, or the tracker saw it finish) frees its in-flight slot; one Ray completion callback per call
        # instead cost a third of the pipelined call rate (GIL handoffs with Ray's completion thread).
        self._issued: dict[Any, tuple[int, int]] = {}
        self._tracker: threading.Thread | None = None
        self._track_now = threading.Event()
        self._work: queue.SimpleQueue[Callable[[], None] | None] | None = None
        self._restarting = False
        self._closed: BaseException | None = None  # set by close(): no more calls, restarts or dispatcher work
        self._deepens = adaptive and cap is not None
        self._extra = 0  # calls each actor may hold beyond the cap (MAX_EXTRA_PER_ACTOR)
        self._calm = 0  # batches of finishes in a row that left no actor dry while calls waited

    def submit(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: Hashable | None,
        retry: bool,
        candidates: Sequence[int],
        *,
        in_store: bool = False,
        summary: Callable[[Any], Any] | None = None,
    ) -> RoutedFuture[Any]:
        """Issue a call on one of `candidates` (positions), or queue it until one can take it."""
        future: RoutedFuture[Any] = RoutedFuture(lambda fut, err: self._retry(call, err), self._retire)
        call = RoutedCall(method, args, kwargs, key, retry, candidates, future, in_store, summary)
        if self._closed is not None:
            future.failed(self._closed)
        else:
            self._submit(call, from_queue=False)
        return future

    def release(self, key: Hashable) -> None:
        """The router forgets `key`, if it keeps keys (StickyRouter.release)."""
        release = getattr(self._router, "release", None)
        if release is not None:
            with self._table().lock:
                release(key)

    def wake(self) -> None:
        """Actors came back (restarted, or found alive): queued calls may go now."""
        self._post(self._drain)

    def close(self, error: BaseException) -> None:
        """Fail every queued call (and any later one) with `error` and stop the dispatcher thread. Called before the
        actors are killed, so the calls their deaths fail start no restart."""
        with self._table().lock:
            self._closed = error
            work, self._work = self._work, None
            queued = list(self._queue)
            self._queue.clear()
        if work is not None:
            work.put(None)
        self._track_now.set()
        for call in queued:
            call.future.failed(error)

    def _pick(self, call: RoutedCall) -> int | None:
        table = self._table()
        if table.all_alive:
            live = call.candidates
        else:
            live = [p for p in call.candidates if table.alive[p]]
            if not live:
                # With auto_restart the call waits in the queue for the replacement instead of failing: a run with
                # one engine survives that engine's death.
                return None if self._auto_restart else -1
        cap = None if self._cap is None else self._cap + self._extra
        available = live if cap is None else [p for p in live if table.in_flight[p] < cap]
        return self._router.pick(Load(available, live, table.in_flight), call.key)

    def _submit(self, call: RoutedCall, from_queue: bool) -> bool:
        """Issue a routed call, or queue it; returns False if it was queued."""
        table = self._table()
        with table.lock:
            if self._queue and not from_queue:
                self._queue.append(call)
                call.future.queued()
                return False
            pos = self._pick(call)
            waits_for_restart = pos is None and not any(table.alive[p] for p in call.candidates)
            if pos is None:
                if not from_queue:
                    self._queue.append(call)
                    call.future.queued()
            elif pos != -1:
                table.in_flight[pos] += 1
                host = through_host(call.in_store, call.args, call.kwargs)
                method = table.method(HOST_CALL if host else call.method, pos)
                generation = table.generation[pos]
                # issued under the lock so the tracker never sees a slot taken by a call it cannot find
                ref, body = issue(method, call.method, host, call.in_store, call.summary, call.args, call.kwargs)
                if not self._issued:
                    self._track_now.set()  # the tracker sleeps while nothing is in flight
                self._issued[ref] = (pos, generation)
                if self._tracker is None:
                    self._start_tracker()
        if pos is None:
            if waits_for_restart:  # e.g. the only engine died: make sure a replacement is on its way
                self._post(self._restart_in_background)
            return False
        if pos == -1:
            call.future.failed(
                ActorDiedError(f"'{call.method}': every actor of mesh '{self._name}' that could take it is dead")
            )
            return True
        call.position, call.generation = pos, generation
        call.future.issued(ref, None if body is None else partial(stored_from, body=body))
        return True

    def _retire(self, finished: Sequence[tuple[Any, BaseException | None]]) -> None:
        """Calls finished, (ref, error if it raised) each, seen together (one ray.wait): free their slots, note dead
        actors, then let queued calls go. Called by a call's waiter or the tracker, whichever is first; a call of an
        actor since replaced counts for neither the count nor the liveness."""
        table = self._table()
        deaths = []
        with table.lock:
            touched = set()
            for ref, error in finished:
                entry = self._issued.pop(ref, None)
                if entry is None:
                    continue
                pos, generation = entry
                if table.generation[pos] == generation:
                    table.in_flight[pos] -= 1
                    touched.add(pos)
                    if isinstance(error, RayActorDiedError):
                        deaths.append((pos, generation))
            queued = bool(self._queue)
            if queued and touched and self._deepens:
                if any(table.in_flight[pos] == 0 for pos in touched):
                    self._extra, self._calm = min(MAX_EXTRA_PER_ACTOR, 2 * self._extra + 1), 0
                else:
                    self._calm += 1
                    if self._calm >= 4:
                        self._extra, self._calm = self._extra // 2, 0
        for pos, generation in deaths:
            self._mark_dead(pos, generation)
        if queued:
            self._drain()

    def _start_tracker(self) -> None:  # under the table lock
        self._tracker = threading.Thread(target=self._track, name=f"rlmesh-track-{self._name}", daemon=True)
        self._tracker.start()

    def _track(self) -> None:
        """Retire finished calls that no waiter has: fire-and-forget calls, and results read late or out of order.
        It looks only at calls issued before its last look, with one non-blocking ray.wait, so it never races a
        waiter for a fresh result. It notes what is in flight after retiring, so the calls its retirement handed out
        are seen with the rest: the next look can then find all of an actor's calls finished, which is what lets the
        depth adapt when the tracker alone retires a flood of short calls."""
        table = self._table()
        seen: list[Any] = []
        while self._closed is None:
            with table.lock:
                idle = not self._issued and not seen
                tick = _TRACK_QUEUED_S if self._queue else _TRACK_IDLE_S
            self._track_now.wait(None if idle else tick)
            self._track_now.clear()
            with table.lock:
                older = [ref for ref in seen if ref in self._issued]
            if older:
                done, _ = ray.wait(older, num_returns=len(older), timeout=0, fetch_local=False)
                if done:
                    self._retire([(ref, _error_of(ref)) for ref in done])
            with table.lock:
                seen = list(self._issued)

    def _mark_dead(self, pos: int, generation: int) -> None:
        table = self._table()
        with table.lock:
            if table.generation[pos] != generation:
                return  # the dead actor was already replaced; its successor is fine
            was_alive = table.alive[pos]
            table.alive[pos] = False
            table.all_alive = False
        if was_alive and self._auto_restart:
            self._post(self._restart_in_background)

    def _retry(self, call: RoutedCall, err: BaseException) -> None:
        """Called by the waiter of a call whose actor failed: re-issue it elsewhere, or raise why not."""
        pos = call.position
        who = self._describe(pos)
        if isinstance(err, RayActorDiedError):
            self._mark_dead(pos, call.generation)
        if not call.retry or call.attempts + 1 >= _MAX_CHOOSE_ATTEMPTS:
            reason = "not idempotent, so not retried" if not call.retry else f"{call.attempts + 1} attempts"
            raise ActorDiedError(f"'{call.method}' failed: {who} died ({reason}): {last_line(err)}") from err
        call.attempts += 1
        with self._table().lock:
            self._table().faults["retried_calls"] += 1
        log.warning("'%s' lost %s; retrying on another actor", call.method, who)
        call.future.new_attempt()
        self._submit(call, from_queue=False)

    def _drain(self) -> None:  # by whichever thread retired a call, or the dispatcher after a restart
        while True:
            with self._table().lock:
                if not self._queue:
                    return
                call = self._queue.popleft()
            if not self._submit(call, from_queue=True):
                with self._table().lock:
                    self._queue.appendleft(call)
                return

    def _restart_in_background(self) -> None:
        if self._restarting or self._closed is not None:
            return
        self._restarting = True
        try:
            self._restart()
        except Exception as err:
            log.exception("mesh '%s': automatic restart failed", self._name)
            self._fail_stranded(err)
        finally:
            self._restarting = False

    def _fail_stranded(self, err: BaseException) -> None:
        """Fail the queued calls that no live actor can take: they waited for a restart that did not happen."""
        table = self._table()
        with table.lock:
            stranded = [call for call in self._queue if not any(table.alive[p] for p in call.candidates)]
            for call in stranded:
                self._queue.remove(call)
        for call in stranded:
            call.future.failed(
                ActorDiedError(
                    f"'{call.method}': every actor of mesh '{self._name}' that could take it is dead, and restarting "
                    f"them failed: {last_line(err)}"
                )
            )

    def _post(self, work: Callable[[], None]) -> None:
        """Run `work` (a restart, or draining after one) on the mesh's dispatcher thread, off the caller's."""
        with self._table().lock:
            if self._closed is not None:
                return  # the mesh was shut down: nothing is left to drain or restart
            if self._work is None:
                self._work = queue.SimpleQueue()
                threading.Thread(
                    target=_dispatcher, args=(self._work,), name=f"rlmesh-{self._name}", daemon=True
                ).start()
            pending = self._work
        pending.put(work)


def _error_of(ref: Any) -> BaseException | None:
    """The error a finished call raised, or None."""
    try:
        ray.get(ref, timeout=0)
    except Exception as err:
        return err
    return None


def _dispatcher(work: queue.SimpleQueue[Callable[[], None] | None]) -> None:
    while (job := work.get()) is not None:
        try:
            job()
        except Exception:
            log.exception("rlmesh dispatcher job failed")
