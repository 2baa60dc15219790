"""ActorMesh: a shaped group of Ray actors whose @endpoint methods are called with all, choose, shard or call_one."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Generic, Literal, ParamSpec, TypeVar, overload

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from rlmesh import spans
from rlmesh.mesh import process_groups
from rlmesh.mesh.context import MeshRank, _enter
from rlmesh.mesh.dispatch import ShardPlan, concat, split_args, unpad
from rlmesh.mesh.endpoint import Collect, Dispatch, EndpointSpec, endpoints_of
from rlmesh.mesh.futures import ActorDiedError, GatheredFuture, MeshFuture, last_line, settle
from rlmesh.mesh.placement import Placement, PlacementError
from rlmesh.mesh.routed import HOST_CALL, ActorTable, RoutedCalls, issue, pull_cap, through_host
from rlmesh.mesh.routing import RouterLike, make_router
from rlmesh.mesh.shape import Shape, ShapeLike, select, slice_by_name
from rlmesh.mesh.stored import Stored, StoredRows, resolve, resolve_async, split_result, stored_from
from rlmesh.wire import WireTensor

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

# Arguments bigger than this are put in the object store once per call instead of once per receiving actor.
_PUT_ONCE_BYTES = 100 * 1024
_MAX_CHOOSE_ATTEMPTS = 3


class MeshStartError(RuntimeError):
    """One or more actors of a mesh failed to start; the message names each one and why."""


# ---------------------------------------------------------------- the actor side


def _host_class(cls: type) -> type:
    """A subclass of the user's class that learns its mesh place before running the user's __init__."""

    def __init__(self: Any, place: MeshRank, distributed: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._rlmesh_place, self._rlmesh_distributed = place, distributed
        self._rlmesh_ctor = (args, kwargs)

    def _rlmesh_address(self: Any) -> tuple[str, int]:
        host = process_groups.bind_host()
        return host, process_groups.free_port(host)

    def _rlmesh_setup(self: Any, master_addr: str | None, master_port: int | None) -> str:
        place = replace(self._rlmesh_place, master_addr=master_addr, master_port=master_port)
        _enter(place, self._rlmesh_distributed)
        args, kwargs = self._rlmesh_ctor
        cls.__init__(self, *args, **kwargs)  # type: ignore[misc]
        return str(ray.get_runtime_context().get_node_id())

    def _rlmesh_ping(self: Any) -> bool:
        return True

    def _rlmesh_open_store(self: Any, name: str, world_size: int, timeout_s: float) -> tuple[str, int]:
        return process_groups.open_store(name, world_size, timeout_s)

    def _rlmesh_join_group(self: Any, *args: Any) -> None:
        process_groups.join(*args)

    def _rlmesh_leave_group(self: Any, name: str) -> bool:
        return process_groups.leave(name)

    # Calls that take StoredRows arguments or keep their result in the object store go through _rlmesh_call:
    # it fetches the rows here, in the actor, and splits the result into (rows, summary) and the value.
    def _rlmesh_call(self: Any, method: str, in_store: bool, summary: Any, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = resolve(args, kwargs)
        value = getattr(self, method)(*args, **kwargs)
        return split_result(value, summary(value) if summary else None) if in_store else value

    async def _rlmesh_call_async(
        self: Any, method: str, in_store: bool, summary: Any, *args: Any, **kwargs: Any
    ) -> Any:
        args, kwargs = await resolve_async(args, kwargs)
        value = getattr(self, method)(*args, **kwargs)
        if inspect.isawaitable(value):
            value = await value
        return split_result(value, summary(value) if summary else None) if in_store else value

    def _rlmesh_spans(self: Any) -> dict[str, Any]:
        place = self._rlmesh_place
        node = ray.get_runtime_context().get_node_id()
        return {
            "mesh": place.mesh_name,
            "rank": place.rank,
            "coords": dict(place.coords),
            "node": node,
            "spans": spans.drain(),
        }

    # A coroutine method makes Ray run the actor on an event loop; only classes that already have one get it.
    endpoints = endpoints_of(cls)
    is_async = any(spec.is_async for spec in endpoints.values())
    members = {
        # every endpoint call is a span of this process (drained by _rlmesh_spans into the step's trace)
        **{
            name: _traced(name, getattr(cls, name), spec.is_async)
            for name, spec in endpoints.items()
            if _traceable(cls, name)
        },
        "_rlmesh_spans": _rlmesh_spans,
        "__init__": __init__,
        "_rlmesh_address": _rlmesh_address,
        "_rlmesh_setup": _rlmesh_setup,
        "_rlmesh_ping": _rlmesh_ping,
        "_rlmesh_open_store": _rlmesh_open_store,
        "_rlmesh_join_group": _rlmesh_join_group,
        "_rlmesh_leave_group": _rlmesh_leave_group,
        "_rlmesh_call": _rlmesh_call_async if is_async else _rlmesh_call,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    return type(cls.__name__, (cls,), members)


def _traceable(cls: type, name: str) -> bool:
    """A plain method or coroutine: static and class methods, and generators, keep their own form unwrapped."""
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, staticmethod | classmethod):
        return False
    method = getattr(cls, name)
    return not (inspect.isgeneratorfunction(method) or inspect.isasyncgenfunction(method))


def _trace_args(actor: Any) -> dict[str, Any]:
    """What a role adds to the spans of its calls (its `trace_args()`: an engine's weight version, say)."""
    hook = getattr(actor, "trace_args", None)
    return dict(hook()) if callable(hook) else {}


def _traced(name: str, method: Callable[..., Any], is_async: bool) -> Callable[..., Any]:
    """`method` recording each call as a span named after the endpoint (its marks and signature kept)."""
    if is_async:

        async def traced_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            start, extra = time.time_ns(), _trace_args(self)
            try:
                return await method(self, *args, **kwargs)
            finally:
                spans.record(name, start, time.time_ns(), **extra)

        return functools.wraps(method)(traced_async)

    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        start, extra = time.time_ns(), _trace_args(self)
        try:
            return method(self, *args, **kwargs)
        finally:
            spans.record(name, start, time.time_ns(), **extra)

    return functools.wraps(method)(traced)


_remote_classes: weakref.WeakKeyDictionary[type, Any] = weakref.WeakKeyDictionary()


def _remote_class(cls: type) -> Any:
    """The user's class made remote once; every actor of every mesh of it is created from this with .options."""
    if cls not in _remote_classes:
        _remote_classes[cls] = ray.remote(_host_class(cls))
    return _remote_classes[cls]


# ---------------------------------------------------------------- endpoints bound to a mesh


class Endpoint(Generic[P, R]):
    """An @endpoint method bound to a mesh: the verbs to call it."""

    def __init__(self, mesh: ActorMesh[Any], spec: EndpointSpec, route_key: Hashable | None = None) -> None:
        self._mesh = mesh
        self._spec = spec
        self._route_key = route_key

    def all(self, *args: P.args, **kwargs: P.kwargs) -> MeshFuture[list[R]]:
        """Every actor runs the call on the same arguments; results come back in rank order."""
        return self._mesh._call_all(self._spec, args, kwargs)

    def choose(self, *args: P.args, **kwargs: P.kwargs) -> MeshFuture[R]:
        """One actor runs the call, picked by the mesh's router; retried on a live actor if its actor dies."""
        return self._mesh._call_routed(self._spec, args, kwargs, self._route_key)

    def shard(self, *args: P.args, **kwargs: P.kwargs) -> MeshFuture[R]:
        """Split the batch over the data-parallel dimension, replicate over the others, gather in order."""
        return self._mesh._call_sharded(self._spec, args, kwargs)

    def call_one(self, *args: P.args, **kwargs: P.kwargs) -> MeshFuture[R]:
        """Call the only actor of a single-actor mesh (index one first: `mesh[i].method.call_one(...)`)."""
        return self._mesh._call_one(self._spec, args, kwargs)

    def options(
        self,
        *,
        route_key: Hashable | None = None,
        dispatch: Dispatch | None = None,
        collect: Collect | None = None,
        idempotent: bool | None = None,
    ) -> Endpoint[P, R]:
        """The same endpoint with per-call settings: a routing key for sticky routing, or dispatch/collect."""
        spec = self._spec
        if dispatch is not None:
            spec = replace(spec, dispatch=dispatch)
        if collect is not None:
            spec = replace(spec, collect=collect)
        if idempotent is not None:
            spec = replace(spec, idempotent=idempotent)
        return Endpoint(self._mesh, spec, route_key if route_key is not None else self._route_key)

    @overload
    def in_store(self) -> StoredEndpoint[P, R, None]: ...
    @overload
    def in_store(self, summary: Callable[[R], S]) -> StoredEndpoint[P, R, S]: ...
    def in_store(self, summary: Callable[[R], Any] | None = None) -> StoredEndpoint[P, R, Any]:
        """The same endpoint with its result kept in the object store: calls return Stored(rows, summary), where
        `rows` is a StoredRows view of the result and `summary(result)`, computed in the actor, is what comes back.
        Pass the view on to other calls; the actors that take it fetch the rows themselves."""
        spec = replace(self._spec, in_store=True, summary=summary)
        return StoredEndpoint(Endpoint(self._mesh, spec, self._route_key))

    def __repr__(self) -> str:
        return f"<endpoint {self._mesh._name}.{self._spec.name}>"


class StoredEndpoint(Generic[P, R, S]):
    """An endpoint whose results stay in the object store (see Endpoint.in_store): the same verbs, returning
    Stored(rows, summary) instead of the result."""

    def __init__(self, endpoint: Endpoint[P, R]) -> None:
        self._endpoint = endpoint

    def all(self, *args: P.args, **kwargs: P.kwargs) -> MeshFuture[list[Stored[R, S]]]:
        return self._endpoint.all(*args, **kwargs)  # type: ignore[return-value]

    def choose(self, *args: P.args, **kwargs: P.kwargs) -> MeshFuture[Stored[R, S]]:
        return self._endpoint.choose(*args, **kwargs)  # type: ignore[return-value]

    def shard(self, *args: P.args, **kwargs: P.kwargs) -> MeshFuture[Stored[R, S]]:
        """The shards' results as one StoredRows in row order (padding rows dropped), and their summaries
        gathered by the endpoint's collect (default: concatenated)."""
        return self._endpoint.shard(*args, **kwargs)  # type: ignore[return-value]

    def call_one(self, *args: P.args, **kwargs: P.kwargs) -> MeshFuture[Stored[R, S]]:
        return self._endpoint.call_one(*args, **kwargs)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<endpoint {self._endpoint!r} in store>"


# ---------------------------------------------------------------- the mesh


class ActorMesh(Generic[T]):
    """A shaped group of actors of one class. Endpoints hang off the mesh: `mesh.generate.choose(...)`.

    Args:
        cls: a plain class whose exposed methods are marked with @endpoint.
        shape: an int, a tuple of sizes (named dp, tp, pp, ...) or a dict of named sizes; actors = product.
        args, kwargs: passed to every actor's __init__.
        resources: per actor, e.g. {"CPU": 1, "GPU": 1}; each actor gets a placement-group bundle.
        placement: an existing Placement to share bundles with another mesh (colocation); `strategy` otherwise.
        router: how `choose` picks: "power_of_two" (default), "least_loaded", "round_robin", "random", "sticky",
            a Router, or a function (load, key) -> position.
        max_in_flight_per_actor: cap on routed calls per actor; the excess queues in the controller and goes to
            the first actor with a free slot (pull). "auto" (the default): an actor that runs one call at a time (no
            async endpoint) holds at most its max_concurrency + 1, so it always has the next call at hand while the
            rest wait for whichever actor frees first; when calls finish faster than the controller hands them
            out, actors hold up to 32 more (routed.MAX_EXTRA_PER_ACTOR); async actors are not capped. None: no cap
            (push).
        distributed_env: set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in each actor for torch.distributed.
        on_restart: controller-side callback (mesh, restarted positions) run before restarted actors take calls.
        auto_restart: restart dead actors in the background when a routed call finds one.
    """

    def __init__(
        self,
        cls: type[T],
        shape: ShapeLike = 1,
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        resources: Mapping[str, float] | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        name: str | None = None,
        placement: Placement | None = None,
        strategy: str = "PACK",
        router: RouterLike = "power_of_two",
        max_in_flight_per_actor: int | Literal["auto"] | None = "auto",
        distributed_env: bool = True,
        actor_options: Mapping[str, Any] | None = None,
        on_restart: Callable[[ActorMesh[T], list[int]], None] | None = None,
        auto_restart: bool = False,
        start_timeout_s: float = 600.0,
        placement_timeout_s: float = 60.0,
    ) -> None:
        self._shape = Shape.of(shape)
        self._name = name or cls.__name__
        self._cls: type[T] = cls
        self._specs = endpoints_of(cls)
        if not self._specs:
            raise TypeError(f"{cls.__name__} has no @endpoint methods; decorate the methods the mesh should expose")
        clashes = sorted(set(self._specs) & set(dir(ActorMesh)))
        if clashes:
            raise TypeError(
                f"{cls.__name__} endpoint(s) {clashes} clash with ActorMesh's own attributes; rename the method(s)"
            )
        for spec in self._specs.values():
            if spec.shard_dim is not None and spec.shard_dim not in self._shape.names:
                raise ValueError(
                    f"endpoint {cls.__name__}.{spec.name} shards over {spec.shard_dim!r}, "
                    f"which is not a dimension of shape {self._shape.as_dict()}"
                )
        adaptive = max_in_flight_per_actor == "auto"
        if adaptive:
            max_in_flight_per_actor = pull_cap(self._specs.values(), actor_options or {})
        elif max_in_flight_per_actor is not None and (
            isinstance(max_in_flight_per_actor, str) or max_in_flight_per_actor < 1
        ):
            raise ValueError(f"max_in_flight_per_actor must be >= 1, 'auto' or None, got {max_in_flight_per_actor!r}")
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialized; call ray.init(...) (or rlmesh's cluster setup) before a mesh")
        self._root: ActorMesh[T] = self
        self._positions = list(range(self._shape.size))
        self._on_restart = on_restart
        self._router_spec = router
        self._routed = RoutedCalls(
            self._name,
            make_router(router),
            max_in_flight_per_actor,
            auto_restart,
            table=lambda: self._table,
            describe=self._describe_position,
            restart=self.restart_dead,
            adaptive=adaptive,
        )
        self._distributed = distributed_env
        self._runtime_env = dict(runtime_env or {})
        self._actor_options = dict(actor_options or {})
        self._args, self._kwargs = tuple(args), dict(kwargs or {})
        self._start_timeout_s = start_timeout_s
        per_actor = dict(resources or {"CPU": 1})
        if placement is None:
            placement = Placement.create(self._shape.size, per_actor, strategy, placement_timeout_s)
        else:
            _check_fits(placement, per_actor, self._shape.size)
            placement = replace(placement, owned=False)
        self._placement = placement
        self._resources = per_actor
        self._master: tuple[str | None, int | None] = (None, None)
        self._table = ActorTable([])
        try:
            self._start()
        except BaseException:
            placement.remove()
            raise
        self._bind_endpoints()

    @classmethod
    def spawn(cls, actor_cls: type[T], shape: ShapeLike = 1, **options: Any) -> ActorMesh[T]:
        """Same as ActorMesh(actor_cls, shape, **options)."""
        return cls(actor_cls, shape, **options)

    # ------------------------------------------------------------ start and restart

    def _places(self) -> list[MeshRank]:
        nodes = self._placement.node_ids()
        world = self._shape.size
        places = []
        for rank in range(world):
            same_node = [r for r in range(world) if nodes[r] == nodes[rank]]
            places.append(
                MeshRank(
                    mesh_name=self._name,
                    rank=rank,
                    coords=self._shape.coords(rank),
                    shape=self._shape.as_dict(),
                    world_size=world,
                    local_rank=same_node.index(rank),
                    local_world_size=len(same_node),
                )
            )
        return places

    def _create(self, rank: int, place: MeshRank) -> Any:
        res = dict(self._resources)
        options: dict[str, Any] = {
            "num_cpus": res.pop("CPU", 0),
            "num_gpus": res.pop("GPU", 0),
            "scheduling_strategy": self._placement.strategy_for(rank),
            **self._actor_options,
        }
        if "memory" in res:
            options["memory"] = res.pop("memory")
        if res:
            options["resources"] = res
        if self._runtime_env:
            options["runtime_env"] = self._runtime_env
        return _remote_class(self._cls).options(**options).remote(place, self._distributed, self._args, self._kwargs)

    def _start(self) -> None:
        places = self._places()
        handles = [self._create(rank, place) for rank, place in enumerate(places)]
        self._table = ActorTable(handles)
        try:
            if self._distributed:
                self._master = ray.get(handles[0]._rlmesh_address.remote(), timeout=self._start_timeout_s)
            refs: list[Any] = [h._rlmesh_setup.remote(*self._master) for h in handles]
            self._await_setup(refs, list(range(len(handles))))
        except BaseException as err:
            for h in handles:
                ray.kill(h)
            if isinstance(err, (MeshStartError, KeyboardInterrupt)):
                raise
            raise MeshStartError(f"mesh '{self._name}' could not start: {err}") from err

    def _await_setup(self, refs: list[Any], positions: list[int]) -> None:
        settled = settle(refs, self._start_timeout_s)
        late = f"not ready within {self._start_timeout_s:.0f}s"
        failures = [
            f"{self._describe_position(pos)}: {late if i in settled.unfinished else last_line(settled.errors[i])}"
            for i, pos in enumerate(positions)
            if i in settled.unfinished or i in settled.errors
        ]
        if failures:
            raise MeshStartError(
                f"mesh '{self._name}': {len(failures)} actor(s) failed to start:\n  " + "\n  ".join(failures)
            )

    def restart_dead(self) -> list[int]:
        """Replace dead actors with new ones in the same place, re-run setup and the `on_restart` hooks
        (the class's `on_restart` method, then the mesh's callback), and return the restarted positions."""
        with self._root._table.restart_lock:
            return self._restart_dead()

    def release_route_key(self, key: Hashable) -> None:
        """A session routed by `key` (`endpoint.options(route_key=key)`) ended: the router may forget it."""
        self._root._routed.release(key)

    def drain_spans(self, timeout_s: float = 2.0) -> list[dict[str, Any]]:
        """The spans each actor recorded since its last drain (its endpoint calls, and what its code recorded with
        rlmesh.spans), one dict per actor that answered within `timeout_s`: mesh, rank, coords, node, spans. An
        actor busy with a long call answers later, and its spans come with a later drain: none is lost, and a busy
        actor costs the caller at most `timeout_s` once. A dead actor's spans are gone with it."""
        table = self._root._table
        with table.lock:
            handles, generations = list(table.handles), list(table.generation)
        pending = table.span_drains
        fresh = []
        for pos, handle in enumerate(handles):
            if pos not in pending or pending[pos][0] != generations[pos]:  # none pending, or its actor was replaced
                pending[pos] = (generations[pos], handle._rlmesh_spans.remote())
                fresh.append(pos)
        answered: dict[int, Any] = {}
        # Drains issued now get the timeout; one still pending from an earlier call (its actor was busy then) is
        # only looked at, so an actor busy at every call does not cost each of them the timeout.
        for positions, wait_s in ((fresh, timeout_s), ([p for p in sorted(pending) if p not in fresh], 0.0)):
            drained = settle([pending[pos][1] for pos in positions], wait_s)
            for index in set(drained.values) | set(drained.errors):
                del pending[positions[index]]
            answered |= {positions[index]: value for index, value in drained.values.items()}
        return [answered[pos] for pos in sorted(answered)]

    def fault_counts(self) -> dict[str, int]:
        """Routed calls re-issued because their actor died, and actors restarted, since the mesh started."""
        table = self._root._table
        with table.lock:
            return dict(table.faults)

    def _restart_dead(self) -> list[int]:
        root = self._root
        if root._placement is None:  # an attached mesh: its actors are restarted by the mesh that started them
            return []
        table = root._table
        pinged = settle([h._rlmesh_ping.remote() for h in table.handles], 10)
        # An actor is dead if it says so, or if it was marked dead and does not answer (busy ones may not in time).
        dead = [
            pos
            for pos in range(len(table.handles))
            if isinstance(pinged.errors.get(pos), RayActorError) or (pos in pinged.unfinished and not table.alive[pos])
        ]
        if not dead:
            with table.lock:  # an actor marked dead that answers its ping is alive: calls waiting for it may go
                healed = not table.all_alive
                table.alive = [True] * len(table.alive)
                table.all_alive = True
            if healed:
                root._routed.wake()
            return []
        places = root._places()
        new = {pos: root._create(pos, places[pos]) for pos in dead}
        root._await_setup([new[p]._rlmesh_setup.remote(*root._master) for p in dead], dead)
        if hasattr(root._cls, "on_restart"):
            ray.get([new[p].on_restart.remote() for p in dead], timeout=root._start_timeout_s)
        with table.lock:
            for pos in dead:
                table.handles[pos] = new[pos]
                table.in_flight[pos] = 0
                table.generation[pos] += 1
            table.methods.clear()
        if root._on_restart is not None:
            root._on_restart(root, dead)
        with table.lock:
            for pos in dead:
                table.alive[pos] = True
            table.all_alive = all(table.alive)
            table.faults["restarted_actors"] += len(dead)
        root._routed.wake()
        log.info("mesh '%s' restarted %s", root._name, [root._describe_position(p) for p in dead])
        return dead

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """A mesh passed to another process (an actor's constructor argument, say) arrives attached: it calls the
        same actors, and routes `choose` itself, with a router of its own kind and its own in-flight counts (sticky
        keys stay in the process that uses them). A routed call whose actor died is retried on a live one there;
        restarting actors and shutting them down stay with the mesh that started them."""
        root = self._root
        with root._table.lock:
            handles = list(root._table.handles)
        spec = (root._cls, root._name, root._shape, handles, root._router_spec, root._routed._cap)
        return _attached_mesh, (spec, self._shape, list(self._positions))

    # ------------------------------------------------------------ views

    def _view(self, shape: Shape, positions: list[int]) -> ActorMesh[T]:
        view: ActorMesh[T] = object.__new__(ActorMesh)
        view.__dict__.update(self.__dict__)
        view._shape, view._positions = shape, positions
        view._bind_endpoints()
        return view

    def _bind_endpoints(self) -> None:
        for name, spec in self._specs.items():
            self.__dict__[name] = Endpoint(self, spec)

    def __getitem__(self, key: int | slice | tuple[int | slice, ...]) -> ActorMesh[T]:
        shape, positions = select(self._shape, self._positions, key)
        return self._view(shape, positions)

    def slice(self, **dims: int | slice) -> ActorMesh[T]:
        """A sub-mesh: `mesh.slice(dp=1)` keeps the actors with dp coordinate 1 (an int drops the dimension)."""
        shape, positions = slice_by_name(self._shape, self._positions, dims)
        return self._view(shape, positions)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        cls = self.__dict__.get("_cls")
        if cls is not None and callable(getattr(cls, name, None)):
            raise AttributeError(
                f"{cls.__name__}.{name} is not an @endpoint; decorate it with @endpoint to call it through the mesh"
            )
        known = sorted(self.__dict__.get("_specs", {}))
        raise AttributeError(f"mesh '{self.__dict__.get('_name')}' has no endpoint {name!r}; endpoints: {known}")

    # ------------------------------------------------------------ properties

    @property
    def shape(self) -> dict[str, int]:
        return self._shape.as_dict()

    @property
    def size(self) -> int:
        return len(self._positions)

    def __len__(self) -> int:
        return len(self._positions)

    @property
    def name(self) -> str:
        return self._name

    @property
    def placement(self) -> Placement:
        return self._placement

    @property
    def actors(self) -> list[Any]:
        """The raw Ray handles of this (sub-)mesh's actors, in rank order."""
        return [self._table.handles[p] for p in self._positions]

    def in_flight(self) -> list[int]:
        """Routed calls issued and not yet completed, per actor of this (sub-)mesh."""
        return [self._table.in_flight[p] for p in self._positions]

    def _actor_at(self, pos: int) -> Any:
        return self._table.handles[pos]

    def _describe_position(self, pos: int) -> str:
        return f"{self._name}{self._root._shape.describe(pos)} (rank {pos})"

    def __repr__(self) -> str:
        return f"ActorMesh({self._cls.__name__}, name={self._name!r}, shape={self.shape})"

    # ------------------------------------------------------------ verbs

    def _call_all(self, spec: EndpointSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> MeshFuture[Any]:
        if len(self._positions) > 1:
            args, kwargs = _put_large(args, kwargs)
        calls = [self._invoke(spec, p, args, kwargs) for p in self._positions]
        refs, bodies = [head for head, _ in calls], [body for _, body in calls]
        positions = self._positions
        collect: Collect = list if not spec.in_store else lambda heads: _stored_each(heads, bodies)
        return GatheredFuture(refs, collect, lambda i: self._describe_position(positions[i]), spec.name)

    def _call_one(self, spec: EndpointSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> MeshFuture[Any]:
        if len(self._positions) != 1:
            raise ValueError(
                f"call_one needs a single-actor mesh, '{self._name}' has {len(self._positions)} actors; "
                "index one first (mesh[i]) or use choose/all/shard"
            )
        pos = self._positions[0]
        ref, body = self._invoke(spec, pos, args, kwargs)
        collect: Collect = (lambda values: values[0]) if not spec.in_store else lambda h: _stored_each(h, [body])[0]
        return GatheredFuture([ref], collect, lambda i: self._describe_position(pos), spec.name)

    def _call_sharded(self, spec: EndpointSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> MeshFuture[Any]:
        dim = spec.shard_dim or self._shape.names[0]
        if dim not in self._shape.names:
            raise ValueError(f"cannot shard over {dim!r}: this (sub-)mesh has dimensions {list(self._shape.names)}")
        n_shards = self._shape.as_dict()[dim]
        plan: ShardPlan | None = None
        if spec.dispatch is not None:
            calls = spec.dispatch(n_shards, *args, **kwargs)
            if len(calls) != n_shards:
                raise ValueError(f"dispatch for '{spec.name}' returned {len(calls)} shards, expected {n_shards}")
        else:
            plan = split_args(n_shards, args, kwargs)
            calls = plan.calls
        replicas: list[list[int]] = [[] for _ in range(n_shards)]
        for flat, pos in enumerate(self._positions):
            replicas[self._shape.coords(flat)[dim]].append(pos)
        refs: list[Any] = []
        bodies: list[Any] = []  # with in_store: each primary shard's result, left in the store
        primary: list[int] = []
        owners: list[int] = []
        for shard, (a, k) in enumerate(calls):
            if len(replicas[shard]) > 1:
                a, k = _put_large(tuple(a), dict(k))
            primary.append(len(refs))
            for i, pos in enumerate(replicas[shard]):
                head, body = self._invoke(spec, pos, tuple(a), dict(k))
                refs.append(head)
                owners.append(pos)
                if i == 0:
                    bodies.append(body)
        gather = spec.collect or concat
        # Padding rows come from the default dispatch, so they are dropped before any collect sees the results.
        collect = gather if plan is None else (lambda results: gather(unpad(results, plan)))
        if spec.in_store:
            collect = partial(
                _stored_shards, bodies=bodies, plan=plan, gather=collect, join=spec.collect, name=spec.name
            )
        return GatheredFuture(refs, collect, lambda i: self._describe_position(owners[i]), spec.name, primary)

    def _invoke(self, spec: EndpointSpec, pos: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """Issue one call on the actor at `pos` (see routed.issue): its result's ref, and with in_store the ref of
        the value kept in the store."""
        host = through_host(spec.in_store, args, kwargs)
        method = self._table.method(HOST_CALL if host else spec.name, pos)
        return issue(method, spec.name, host, spec.in_store, spec.summary, args, kwargs)

    def _call_routed(
        self, spec: EndpointSpec, args: tuple[Any, ...], kwargs: dict[str, Any], key: Hashable | None
    ) -> MeshFuture[Any]:
        return self._root._routed.submit(
            spec.name, args, kwargs, key, spec.idempotent, self._positions, in_store=spec.in_store, summary=spec.summary
        )

    # ------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Kill every actor of the mesh and release its placement group. An attached mesh only stops routing."""
        root = self._root
        root._routed.close(ActorDiedError(f"mesh '{root._name}' was shut down"))  # first: deaths below restart nothing
        if root._placement is None:
            return
        with root._table.lock:
            root._table.alive = [False] * len(root._table.handles)
            root._table.all_alive = False
        for h in root._table.handles:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(h)
        root._placement.remove()

    def __enter__(self) -> ActorMesh[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _attached_mesh(spec: tuple[Any, ...], shape: Shape, positions: list[int]) -> ActorMesh[Any]:
    """The mesh ActorMesh.__reduce__ sent: no placement of its own (restart_dead and shutdown leave the actors
    alone), the same endpoints, its own routing."""
    cls, name, root_shape, handles, router, cap = spec
    mesh: ActorMesh[Any] = object.__new__(ActorMesh)
    mesh.__dict__.update(
        _shape=root_shape,
        _name=name,
        _cls=cls,
        _specs=endpoints_of(cls),
        _positions=list(range(root_shape.size)),
        _on_restart=None,
        _router_spec=router,
        _distributed=False,
        _runtime_env={},
        _actor_options={},
        _args=(),
        _kwargs={},
        _start_timeout_s=600.0,
        _placement=None,
        _resources={},
        _master=(None, None),
        _table=ActorTable(handles),
    )
    mesh._root = mesh
    mesh._routed = RoutedCalls(
        name,
        make_router(router),
        cap,
        False,
        table=lambda: mesh._table,
        describe=mesh._describe_position,
        restart=lambda: [],
    )
    mesh._bind_endpoints()
    return mesh if positions == mesh._positions else mesh._view(shape, positions)


def _stored_each(heads: list[Any], bodies: list[Any]) -> list[Stored[Any, Any]]:
    return [stored_from(head, body) for head, body in zip(heads, bodies, strict=True)]


def _stored_shards(
    heads: list[tuple[int, Any]],
    *,
    bodies: list[Any],
    plan: ShardPlan | None,
    gather: Collect,
    join: Collect | None,
    name: str,
) -> Stored[Any, Any]:
    """One Stored for a sharded in_store call: the shards' kept rows in order (padding rows dropped), joined on
    fetch by the endpoint's collect, and their summaries gathered by the same collect (after their padding rows are
    dropped), so a summary should be of a kind the endpoint's collect gathers."""
    views = []
    for shard, ((rows, _), body) in enumerate(zip(heads, bodies, strict=True)):
        if plan is not None and rows != plan.rows_per_shard:  # a view must line up with the rows it was given
            raise ValueError(f"'{name}' returned {rows} rows for a shard of {plan.rows_per_shard} (shard {shard})")
        real = rows if plan is None else plan.real_rows[shard]
        if real > 0:
            views.append(StoredRows.of(body, rows)[:real])
    summaries = [summary for _, summary in heads]
    gathered = None if all(summary is None for summary in summaries) else gather(summaries)
    return Stored(StoredRows.concat(views).joined_by(join), gathered)


def _check_fits(placement: Placement, per_actor: Mapping[str, float], n: int) -> None:
    if len(placement.bundles) < n:
        raise PlacementError(f"the shared placement has {len(placement.bundles)} bundles, the mesh needs {n}")
    for k, v in per_actor.items():
        have = placement.bundles[0].get(k, 0.0)
        if v > have:
            raise PlacementError(
                f"each actor asks for {k}={v}, but a bundle of the shared placement holds {k}={have}; "
                "ask for a fraction of the bundle when colocating"
            )


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, np.ndarray):
        return int(x.nbytes)
    if isinstance(x, (bytes, bytearray)):
        return len(x)
    n = getattr(x, "nbytes", 0)
    return n if isinstance(n, int) else 0


def _put_large(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Put large arguments in the object store once, so every receiving actor reads the same copy."""
    return tuple(_put_if_large(a) for a in args), {k: _put_if_large(v) for k, v in kwargs.items()}


def _put_if_large(x: Any) -> Any:
    if _nbytes(x) <= _PUT_ONCE_BYTES:
        return x
    return ray.put(WireTensor(x) if isinstance(x, torch.Tensor) else x)
