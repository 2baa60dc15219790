"""Futures returned by mesh calls: block with .result(), or await them; several can be waited on together."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Generator, Sequence
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
    """The result of a routed (`choose`) call. The mesh sets it, after retries, from completion callbacks."""

    def __init__(self) -> None:
        self._future: concurrent.futures.Future[R] = concurrent.futures.Future()

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> R:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"routed call did not finish within {timeout}s") from None

    def __await__(self) -> Generator[Any, None, R]:
        return asyncio.wrap_future(self._future).__await__()

    def set_result(self, value: R) -> None:
        self._future.set_result(value)

    def set_exception(self, err: BaseException) -> None:
        self._future.set_exception(err)


def wait_all(futures: Sequence[MeshFuture[Any]], timeout: float | None = None) -> list[Any]:
    """Block until every future is done and return their results in order; the timeout covers all of them."""
    deadline = None if timeout is None else time.monotonic() + timeout
    out = []
    for fut in futures:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        out.append(fut.result(remaining))
    return out


class _Unset:
    pass


_UNSET = _Unset()
