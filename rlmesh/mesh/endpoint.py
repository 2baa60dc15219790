"""The @endpoint decorator: marks the methods a mesh exposes and carries their dispatch options and types."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

# dispatch(n_shards, *args, **kwargs) -> one (args, kwargs) per shard; collect(results) -> gathered result
Dispatch = Callable[..., list[tuple[tuple[Any, ...], dict[str, Any]]]]
Collect = Callable[[list[Any]], Any]

ENDPOINT_ATTR = "__rlmesh_endpoint__"


@dataclass(frozen=True)
class EndpointSpec:
    """How a mesh calls one method: its name, whether it is a coroutine, and how `shard` splits and gathers."""

    name: str
    is_async: bool
    dispatch: Dispatch | None = None
    collect: Collect | None = None
    idempotent: bool = True  # a `choose` call whose actor died is retried elsewhere only if this holds
    shard_dim: str | None = None  # the mesh dimension `shard` splits over; None means the first one
    in_store: bool = False  # the result stays in the object store; the caller gets Stored(rows, summary)
    summary: Callable[[Any], Any] | None = None  # with in_store: what of the result comes back, computed in the actor


class EndpointMethod(Generic[P, R_co]):
    """The static type of an @endpoint method on its class. At runtime the class keeps the plain function,
    so Ray sees an ordinary method and calls inside the actor stay direct."""

    @overload
    def __get__(self, instance: None, owner: type) -> EndpointMethod[P, R_co]: ...
    @overload
    def __get__(self, instance: object, owner: type) -> Callable[P, Any]: ...
    def __get__(self, instance: object, owner: type) -> Any:  # pragma: no cover - typing only
        raise NotImplementedError


class _EndpointDecorator:
    def __init__(self, **options: Any) -> None:
        self.options = options

    @overload
    def __call__(self, fn: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]], /) -> EndpointMethod[P, R]: ...
    @overload
    def __call__(self, fn: Callable[Concatenate[Any, P], R], /) -> EndpointMethod[P, R]: ...
    def __call__(self, fn: Callable[..., Any], /) -> Any:
        return _mark(fn, **self.options)


@overload
def endpoint(fn: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]], /) -> EndpointMethod[P, R]: ...
@overload
def endpoint(fn: Callable[Concatenate[Any, P], R], /) -> EndpointMethod[P, R]: ...
@overload
def endpoint(
    *,
    dispatch: Dispatch | None = None,
    collect: Collect | None = None,
    idempotent: bool = True,
    shard_dim: str | None = None,
) -> _EndpointDecorator: ...
def endpoint(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Expose a method on the mesh: `mesh.method.all / choose / shard / call_one`.

    Options: `dispatch` and `collect` replace how `shard` splits arguments and gathers results;
    `idempotent=False` stops `choose` from retrying the call on another actor when its actor dies;
    `shard_dim` names the mesh dimension that `shard` splits over.
    """
    if fn is None:
        return _EndpointDecorator(**options)
    return _mark(fn, **options)


def _mark(fn: Callable[..., Any], **options: Any) -> Any:
    if not callable(fn):
        raise TypeError(f"@endpoint decorates methods, got {fn!r}")
    spec = EndpointSpec(name=fn.__name__, is_async=inspect.iscoroutinefunction(fn), **options)
    setattr(fn, ENDPOINT_ATTR, spec)
    return fn


def endpoints_of(cls: type) -> dict[str, EndpointSpec]:
    """Every @endpoint of a class, inherited ones included. A subclass that overrides an endpoint without
    decorating it again keeps it exposed, with the base's options."""
    found: dict[str, EndpointSpec] = {}
    for name in dir(cls):
        attr = getattr(cls, name, None)
        specs = (getattr(getattr(base, name, None), ENDPOINT_ATTR, None) for base in cls.__mro__)
        spec = next((s for s in specs if isinstance(s, EndpointSpec)), None)
        if spec is not None and callable(attr):
            found[name] = replace(spec, name=name, is_async=inspect.iscoroutinefunction(attr))
    return found
