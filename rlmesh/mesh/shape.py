"""Mesh shapes: named dimensions, flat ranks in row-major order, and slicing into sub-shapes."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

ShapeLike: TypeAlias = "int | Sequence[int] | Mapping[str, int] | Shape"
_DEFAULT_NAMES = ("dp", "tp", "pp", "cp", "ep")


@dataclass(frozen=True)
class Shape:
    """Named dimensions of a mesh. The number of actors is the product of the sizes."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    @staticmethod
    def of(shape: ShapeLike) -> Shape:
        """Normalise an int, a tuple of sizes or a dict of named sizes; tuples get the names dp, tp, pp, ..."""
        if isinstance(shape, Shape):
            return shape
        if isinstance(shape, bool):
            raise TypeError(f"mesh shape must be an int, a tuple or a dict of named sizes, got {shape!r}")
        names: tuple[str, ...]
        sizes: tuple[int, ...]
        if isinstance(shape, int):
            names, sizes = ("dp",), (shape,)
        elif isinstance(shape, Mapping):
            names, sizes = tuple(shape.keys()), tuple(shape.values())
        elif isinstance(shape, Sequence):
            sizes = tuple(shape)
            if len(sizes) > len(_DEFAULT_NAMES):
                raise ValueError(f"mesh shape {shape!r} has more dimensions than default names; pass a dict")
            names = _DEFAULT_NAMES[: len(sizes)]
        else:
            raise TypeError(f"mesh shape must be an int, a tuple or a dict of named sizes, got {shape!r}")
        if not names:
            raise ValueError("mesh shape has no dimensions; use shape=1 for a single actor")
        for name, size in zip(names, sizes, strict=True):
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"mesh dimension {name!r} has size {size!r}; every size must be a positive int")
        if len(set(names)) != len(names):
            raise ValueError(f"mesh dimension names repeat: {names}")
        return Shape(tuple(names), tuple(sizes))

    @property
    def size(self) -> int:
        return math.prod(self.sizes)

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.names, self.sizes, strict=True))

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates by dimension name of a flat rank (row-major: the last dimension varies fastest)."""
        out: dict[str, int] = {}
        for name, size in zip(reversed(self.names), reversed(self.sizes), strict=True):
            out[name] = rank % size
            rank //= size
        return {name: out[name] for name in self.names}

    def rank(self, coords: Mapping[str, int]) -> int:
        flat = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            flat = flat * size + coords[name]
        return flat

    def ranks(self) -> Iterator[int]:
        return iter(range(self.size))

    def describe(self, rank: int) -> str:
        return "{" + ", ".join(f"{k}={v}" for k, v in self.coords(rank).items()) + "}"


def select(shape: Shape, positions: Sequence[int], key: object) -> tuple[Shape, list[int]]:
    """Apply an index (int, slice, or a tuple of them) to a shape.

    `positions` maps each flat rank of `shape` to an index into the root actor table. Integers drop their
    dimension, slices keep it. Returns the sub-shape and its actors' positions.
    """
    keys = key if isinstance(key, tuple) else (key,)
    if len(keys) > len(shape.names):
        raise IndexError(f"index {key!r} has {len(keys)} parts but the mesh has dimensions {shape.names}")
    per_dim: list[list[int] | int] = []
    for dim, (name, size) in enumerate(zip(shape.names, shape.sizes, strict=True)):
        k = keys[dim] if dim < len(keys) else slice(None)
        if isinstance(k, slice):
            per_dim.append(list(range(size))[k])
            if not per_dim[-1]:
                raise IndexError(f"slice {k} of dimension {name!r} (size {size}) selects no actor")
        elif isinstance(k, int) and not isinstance(k, bool):
            if not -size <= k < size:
                raise IndexError(f"index {k} is out of range for dimension {name!r} of size {size}")
            per_dim.append(k % size)
        else:
            raise TypeError(f"mesh index parts must be ints or slices, got {k!r}")
    return _gather(shape, positions, per_dim)


def slice_by_name(shape: Shape, positions: Sequence[int], dims: Mapping[str, int | slice]) -> tuple[Shape, list[int]]:
    unknown = [d for d in dims if d not in shape.names]
    if unknown:
        raise ValueError(f"unknown mesh dimension(s) {unknown}; this mesh has dimensions {list(shape.names)}")
    return select(shape, positions, tuple(dims.get(name, slice(None)) for name in shape.names))


def _gather(shape: Shape, positions: Sequence[int], per_dim: list[list[int] | int]) -> tuple[Shape, list[int]]:
    kept = [(name, idx) for name, idx in zip(shape.names, per_dim, strict=True) if isinstance(idx, list)]
    choices = [idx if isinstance(idx, list) else [idx] for idx in per_dim]
    selected: list[int] = []

    def walk(dim: int, coords: dict[str, int]) -> None:
        if dim == len(shape.names):
            selected.append(positions[shape.rank(coords)])
            return
        for c in choices[dim]:
            walk(dim + 1, {**coords, shape.names[dim]: c})

    walk(0, {})
    if not kept:  # a single actor: keep a one-element dimension so the sub-mesh is still a mesh
        return Shape(("dp",), (1,)), selected
    return Shape(tuple(n for n, _ in kept), tuple(len(i) for _, i in kept if isinstance(i, list))), selected
