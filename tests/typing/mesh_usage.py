"""Checked by mypy in CI (not run): mesh calls are typed against the actor's methods.

Each `# type: ignore[...]` marks a line mypy must reject; with warn_unused_ignores, an ignore that mypy does not
need fails the check, so a typing regression cannot pass silently.
"""

from __future__ import annotations

from typing import assert_type

from rlmesh.mesh import ActorMesh, MeshFuture, Stored, StoredRows, endpoint


class Sample:
    tokens: list[int]


class Rollout:
    def __init__(self, model_path: str) -> None:
        self.model_path = model_path

    @endpoint
    async def generate(self, prompt_ids: list[int], n: int) -> list[Sample]:
        return []

    @endpoint(idempotent=False)
    def score(self, texts: list[str]) -> list[float]:
        return [0.0 for _ in texts]

    def helper(self) -> int:
        return 1


async def controller(mesh: ActorMesh[Rollout]) -> None:
    fut = mesh.generate.choose([1, 2, 3], 4)
    assert_type(fut, MeshFuture[list[Sample]])
    samples = await fut
    assert_type(samples, list[Sample])
    assert_type(mesh.generate.all([1], n=2).result(), list[list[Sample]])
    assert_type(mesh.score.shard(["a", "b"]).result(), list[float])
    assert_type(mesh[0].generate.call_one([1], 1), MeshFuture[list[Sample]])
    assert_type(mesh.slice(dp=0).score.options(route_key="s").choose(["x"]), MeshFuture[list[float]])

    mesh.generate.choose(["not", "ids"], 4)  # type: ignore[list-item]
    mesh.generate.choose([1, 2])  # type: ignore[call-arg]
    mesh.score.shard([1.0])  # type: ignore[list-item]
    mesh.generate.choose([1], n="4")  # type: ignore[arg-type]
    mesh.helper  # type: ignore[misc]  # noqa: B018 - not an @endpoint


def count(scores: list[float]) -> int:
    return len(scores)


def stored_calls(mesh: ActorMesh[Rollout], texts: StoredRows[list[str]], ids: StoredRows[list[int]]) -> None:
    # A StoredRows[X] goes wherever the method takes an X; in_store calls return Stored(rows, summary).
    assert_type(mesh.score.shard(texts).result(), list[float])
    assert_type(mesh.score.in_store().shard(texts).result(), Stored[list[float], None])
    assert_type(mesh.score.in_store(count).shard(["a"]).result().summary, int)
    assert_type(mesh.generate.in_store().choose(ids, 2).result().rows, StoredRows[list[Sample]])
    mesh.score.shard(ids)  # type: ignore[arg-type]
    mesh.score.in_store().shard(ids)  # type: ignore[arg-type]
    mesh.score.in_store(len).shard(texts).result().summary.upper()  # type: ignore[attr-defined]
    mesh.no_such_method  # type: ignore[misc]  # noqa: B018


def build() -> ActorMesh[Rollout]:
    return ActorMesh(Rollout, {"dp": 2}, args=("path",))
