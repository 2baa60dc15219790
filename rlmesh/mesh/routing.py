"""Routers for `choose`: which live actor takes the next call, from the in-flight counts the mesh keeps."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Load:
    """What a router sees. `available` are live actors under the in-flight cap; `live` are all live actors;
    `in_flight` is indexed by actor position and counts calls issued but not yet completed."""

    available: Sequence[int]
    live: Sequence[int]
    in_flight: Sequence[int]


@runtime_checkable
class Router(Protocol):
    def pick(self, load: Load, key: Hashable | None) -> int | None:
        """Return an actor position from `load.available`, or None to queue the call until a slot frees."""
        ...


class RandomRouter:
    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def pick(self, load: Load, key: Hashable | None) -> int | None:
        return self._rng.choice(load.available) if load.available else None


class RoundRobinRouter:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, load: Load, key: Hashable | None) -> int | None:
        if not load.available:
            return None
        return load.available[next(self._counter) % len(load.available)]


class LeastLoadedRouter:
    """The actor with the fewest calls in flight; ties go round-robin so idle actors share the work."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, load: Load, key: Hashable | None) -> int | None:
        if not load.available:
            return None
        fewest = min(load.in_flight[i] for i in load.available)
        tied = [i for i in load.available if load.in_flight[i] == fewest]
        return tied[next(self._counter) % len(tied)]


class PowerOfTwoRouter:
    """Sample two actors, take the less loaded: near least-loaded quality at O(1) cost (Mitzenmacher 2001)."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def pick(self, load: Load, key: Hashable | None) -> int | None:
        avail = load.available
        n = len(avail)
        if n <= 1:
            return avail[0] if avail else None
        # two distinct picks without random.sample, which costs more than the rest of a routed call
        i = int(self._rng.random() * n)
        j = int(self._rng.random() * (n - 1))
        a, b = avail[i], avail[j + 1 if j >= i else j]
        return a if load.in_flight[a] <= load.in_flight[b] else b


class StickyRouter:
    """The same key goes to the same actor while it lives (sessions, an adapter loaded on one engine).

    Calls without a key, and keys seen for the first time, go through `fallback`. A key whose actor is at the
    in-flight cap waits for it instead of moving; a key whose actor died is reassigned.
    """

    def __init__(self, fallback: Router | None = None) -> None:
        self._fallback = fallback or PowerOfTwoRouter()
        self._owner: dict[Hashable, int] = {}

    def pick(self, load: Load, key: Hashable | None) -> int | None:
        if key is None:
            return self._fallback.pick(load, None)
        owner = self._owner.get(key)
        if owner is not None and owner in load.live:
            return owner if owner in load.available else None
        chosen = self._fallback.pick(load, None)
        if chosen is not None:
            self._owner[key] = chosen
        return chosen

    def release(self, key: Hashable) -> None:
        """Forget `key` (its session ended): a long run's keys would otherwise pile up."""
        self._owner.pop(key, None)


class _CallableRouter:
    def __init__(self, fn: Callable[[Load, Hashable | None], int | None]) -> None:
        self._fn = fn

    def pick(self, load: Load, key: Hashable | None) -> int | None:
        return self._fn(load, key)


ROUTERS: dict[str, Callable[[], Router]] = {
    "random": RandomRouter,
    "round_robin": RoundRobinRouter,
    "power_of_two": PowerOfTwoRouter,
    "least_loaded": LeastLoadedRouter,
    "sticky": StickyRouter,
}

RouterLike = str | Router | Callable[[Load, Hashable | None], int | None]


def make_router(spec: RouterLike) -> Router:
    """A router from a name in ROUTERS, a Router object, or a plain function (load, key) -> position | None."""
    if isinstance(spec, str):
        if spec not in ROUTERS:
            raise ValueError(f"unknown router {spec!r}; known routers: {sorted(ROUTERS)}")
        return ROUTERS[spec]()
    if isinstance(spec, Router):
        return spec
    if callable(spec):
        return _CallableRouter(spec)
    raise TypeError(f"router must be a name, a Router or a function, got {spec!r}")
