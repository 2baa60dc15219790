"""Values that stay in Ray's object store: row views the controller splits and joins without fetching the data."""

from __future__ import annotations

import asyncio
import bisect
import importlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import ray

from rlmesh.mesh.dispatch import concat
from rlmesh.mesh.futures import GatheredFuture, MeshFuture

T = TypeVar("T")
S = TypeVar("S")


@dataclass(frozen=True)
class _Piece:
    """Rows [start, stop) of one stored value."""

    ref: ray.ObjectRef
    start: int
    stop: int


@dataclass(frozen=True)
class _Group:
    """One column group: pieces in row order, and how to join them (a sharded call's collect; None: concat)."""

    pieces: tuple[_Piece, ...]
    join: Callable[[list[Any]], Any] | None = None

    @property
    def rows(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)


class StoredRows(Generic[T]):
    """Rows of values kept in the object store, as one value of type T once fetched.

    A view has one or more column groups over the same rows; each group is a sequence of pieces (rows of stored
    values, in order). Selecting rows, joining views row-wise (`concat`, which makes `shard` split a view as it
    splits a Batch) and adding column groups (`with_columns`) only rearrange references. `fetch` (in the actor that
    needs the rows) reads the pieces straight from the store, joins each group's pieces (with the collect of the
    sharded call that made them, else the mesh's default concat), and the groups with the values' `merge` (later
    groups' fields win).
    """

    __slots__ = ("_groups", "_rows")

    def __init__(self, groups: Sequence[_Group]) -> None:
        lengths = {group.rows for group in groups}
        if len(lengths) != 1:
            raise ValueError(f"every column group of a StoredRows needs the same number of rows, got {lengths}")
        self._groups = tuple(groups)
        self._rows = lengths.pop()

    @classmethod
    def of(cls, ref: ray.ObjectRef, rows: int) -> StoredRows[Any]:
        """All `rows` rows of the stored value `ref`."""
        return cls([_Group((_Piece(ref, 0, rows),))])

    def joined_by(self, join: Callable[[list[Any]], Any] | None) -> StoredRows[T]:
        """The same view, whose groups' pieces are joined by `join` (a sharded call's collect) on fetch."""
        return StoredRows([_Group(group.pieces, join) for group in self._groups])

    @classmethod
    def put(cls, value: Any) -> StoredRows[Any]:
        """Put a value with rows (len) in the store. For small values the controller makes: its own data."""
        return cls.of(ray.put(value), len(value))

    def __len__(self) -> int:
        return self._rows

    @property
    def refs(self) -> list[ray.ObjectRef]:
        """The stored values this view reads, each once."""
        return list({p.ref: None for group in self._groups for p in group.pieces})

    def __getitem__(self, index: slice | Sequence[int] | Any) -> StoredRows[T]:
        """The rows at `index` (a slice, a sequence of ints, or a bool mask), in that order."""
        positions = _positions(index, self._rows)
        return StoredRows([_Group(_select(group.pieces, positions), group.join) for group in self._groups])

    @classmethod
    def concat(cls, parts: Sequence[StoredRows[T]]) -> StoredRows[T]:
        """The rows of `parts`, in order. Every part needs the same number of column groups."""
        widths = {len(part._groups) for part in parts}
        if len(widths) != 1:
            raise ValueError(f"StoredRows.concat: the parts have {sorted(widths)} column groups; give them the same")
        groups = []
        for g in range(widths.pop()):
            pieces = tuple(p for part in parts for p in part._groups[g].pieces)
            groups.append(_Group(pieces, parts[0]._groups[g].join))
        return cls(groups)

    def with_columns(self, *others: StoredRows[Any]) -> StoredRows[T]:
        """The same rows with the column groups of `others` added after these (their fields win on fetch)."""
        for other in others:
            if len(other) != self._rows:
                raise ValueError(f"cannot add columns of {len(other)} rows to a StoredRows of {self._rows} rows")
        return StoredRows([*self._groups, *(g for other in others for g in other._groups)])

    def fetch(self) -> T:
        """The rows as one value: read from the store (in the process that calls it), joined, merged."""
        values = dict(zip(self.refs, ray.get(self.refs), strict=True))
        return _assemble(self._groups, values)

    async def fetch_async(self) -> T:
        refs = self.refs
        values = dict(zip(refs, await asyncio.gather(*refs), strict=True))
        return _assemble(self._groups, values)

    def __repr__(self) -> str:
        pieces = sum(len(g.pieces) for g in self._groups)
        return f"StoredRows(rows={self._rows}, column_groups={len(self._groups)}, pieces={pieces})"


@dataclass(frozen=True)
class Stored(Generic[T, S]):
    """A call's result kept in the object store (`rows`) and the small summary of it that came back."""

    rows: StoredRows[T]
    summary: S


def _positions(index: Any, size: int) -> list[int]:
    if isinstance(index, slice):
        return list(range(*index.indices(size)))
    if hasattr(index, "tolist"):
        index = index.tolist()
    items = list(index)
    if items and isinstance(items[0], bool):
        if len(items) != size:
            raise IndexError(f"a bool mask of {len(items)} entries for {size} rows")
        return [i for i, keep in enumerate(items) if keep]
    for i in items:
        if not -size <= i < size:
            raise IndexError(f"row {i} out of range for {size} rows")
    return [i % size for i in items]


def _select(pieces: Sequence[_Piece], positions: list[int]) -> tuple[_Piece, ...]:
    """The pieces holding `positions`, in order, with runs of consecutive rows of one value kept as one piece."""
    starts = [0]
    for p in pieces:
        starts.append(starts[-1] + p.stop - p.start)
    out: list[_Piece] = []
    for row in positions:
        k = bisect.bisect_right(starts, row) - 1
        piece = pieces[k]
        local = piece.start + row - starts[k]
        last = out[-1] if out else None
        if last is not None and last.ref == piece.ref and last.stop == local:
            out[-1] = _Piece(last.ref, last.start, local + 1)
        else:
            out.append(_Piece(piece.ref, local, local + 1))
    return tuple(out)


def _assemble(groups: Sequence[_Group], values: Mapping[ray.ObjectRef, Any]) -> Any:
    columns = []
    for group in groups:
        parts = [_rows_of(values[p.ref], p.start, p.stop) for p in group.pieces]
        columns.append(parts[0] if len(parts) == 1 else (group.join or concat)(parts))
    if len(columns) == 1:
        return columns[0]
    merge = getattr(type(columns[0]), "merge", None)
    if merge is None:
        raise TypeError(f"{type(columns[0]).__name__} has no merge(parts) classmethod to join column groups")
    return merge(columns)


def _rows_of(value: Any, start: int, stop: int) -> Any:
    if start == 0 and stop == len(value):
        return value
    return value[start:stop]


# ---------------------------------------------------------------- resolving views where the rows are used


def resolve(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Replace every StoredRows argument by its fetched value (in the process that runs the call)."""
    return (
        tuple(a.fetch() if isinstance(a, StoredRows) else a for a in args),
        {k: v.fetch() if isinstance(v, StoredRows) else v for k, v in kwargs.items()},
    )


async def resolve_async(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """resolve() for an actor's event loop: the reads are awaited, not blocking the loop."""
    return (
        tuple([await a.fetch_async() if isinstance(a, StoredRows) else a for a in args]),
        {k: await v.fetch_async() if isinstance(v, StoredRows) else v for k, v in kwargs.items()},
    )


def needs_resolving(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    return any(isinstance(a, StoredRows) for a in args) or any(isinstance(v, StoredRows) for v in kwargs.values())


def split_result(value: Any, summary: Any) -> tuple[tuple[int, Any], Any]:
    """(head, value) for a call whose value stays in the store: the head is (rows, summary), what comes back."""
    if not hasattr(value, "__len__"):
        raise TypeError(
            f"a result kept in the object store needs rows (len), got {type(value).__name__}; call without in_store"
        )
    return (len(value), summary), value


def stored_from(head: tuple[int, Any], body: ray.ObjectRef) -> Stored[Any, Any]:
    rows, summary = head
    return Stored(StoredRows.of(body, rows), summary)


# ---------------------------------------------------------------- plain functions run where the data is


class _StoreWorker:
    """Runs plain functions on stored rows, so that work over a whole batch happens next to the object store,
    not in the controller. Stateless: a replacement after a crash computes the same."""

    def warm(self, modules: Sequence[str]) -> None:
        for module in modules:
            importlib.import_module(module)

    def run(self, fn: Callable[..., tuple[Any, Any]], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        args, kwargs = resolve(args, kwargs)
        return split_result(*fn(*args, **kwargs))


_worker: tuple[str, Any] | None = None  # (Ray session, the store worker's handle)
_worker_lock = threading.Lock()


def _store_worker() -> Any:
    global _worker
    context = ray.get_runtime_context()
    # Job ids repeat across Ray sessions in one process; the driver's node id does not.
    session = f"{context.get_job_id()}-{context.get_node_id()}"
    with _worker_lock:
        if _worker is None or _worker[0] != session:  # a handle of an earlier Ray session is dead
            remote = ray.remote(num_cpus=0, max_restarts=3, max_task_retries=3)(_StoreWorker)
            _worker = (session, remote.remote())
        return _worker[1]


def start_store_worker(imports: Sequence[str] = ()) -> None:
    """Start the store worker now and have it import `imports` (the modules of the functions it will run), so the
    first run_stored does not wait for a process to start; returns at once."""
    _store_worker().warm.remote(list(imports))


def run_stored(fn: Callable[..., tuple[T, S]], *args: Any, **kwargs: Any) -> MeshFuture[Stored[T, S]]:
    """Run `fn(*args, **kwargs) -> (value, summary)` in a helper process; StoredRows arguments arrive fetched.
    Returns a future of Stored(rows of value, summary): the value stays in the store, the summary comes back."""
    head, body = _store_worker().run.options(num_returns=2).remote(fn, args, kwargs)
    return GatheredFuture(
        [head], lambda heads: stored_from(heads[0], body), lambda i: "the store worker", getattr(fn, "__name__", "fn")
    )
