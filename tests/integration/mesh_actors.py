"""Actor classes used by the mesh tests; a module of its own so Ray workers can import them by name."""

from __future__ import annotations

import asyncio
import os
import time

import ray
import torch

from rlmesh.mesh import current_rank, endpoint, get_group


class Worker:
    def __init__(self, tag: str = "w") -> None:
        self.tag = tag
        self.place = current_rank()
        self.calls = 0

    @endpoint
    def whoami(self) -> dict:
        keys = ("RAY_ACTOR_MESH_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        env = {k: os.environ.get(k) for k in keys}
        return {
            "rank": self.place.rank,
            "coords": self.place.coords,
            "world": self.place.world_size,
            "env": env,
            "tag": self.tag,
            "pid": os.getpid(),
        }

    @endpoint
    def echo(self, x):
        return x

    @endpoint
    def double(self, xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    @endpoint
    def rows(self, t: torch.Tensor) -> torch.Tensor:
        return t * 10 + self.place.rank

    @endpoint
    def mixed(self, batch: dict, scale: int) -> dict:
        return {"y": batch["x"] * scale, "ids": [i + 1 for i in batch["ids"]]}

    @endpoint
    def length(self, xs: list) -> int:
        return len(xs)

    @endpoint
    def sleep(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.place.rank

    @endpoint
    def die(self) -> None:
        os._exit(1)

    @endpoint
    def count(self) -> int:
        self.calls += 1
        return self.calls

    @endpoint
    def placement_group_id(self) -> str | None:
        return ray.get_runtime_context().get_placement_group_id()

    def not_exposed(self) -> int:
        return 1


class AsyncWorker:
    def __init__(self) -> None:
        self.rank = current_rank().rank
        self.active = 0
        self.peak = 0

    @endpoint
    async def work(self, seconds: float) -> int:
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(seconds)
        self.active -= 1
        return self.rank

    @endpoint
    async def peak_concurrency(self) -> int:
        return self.peak

    @endpoint
    def die_if(self, rank: int, seconds: float) -> int:
        if self.rank == rank:
            time.sleep(seconds)
            os._exit(1)
        time.sleep(seconds)
        return self.rank


class FailingInit:
    def __init__(self, bad_rank: int) -> None:
        if current_rank().rank == bad_rank:
            raise ValueError(f"rank {bad_rank} refuses to start")

    @endpoint
    def ok(self) -> bool:
        return True


class Restartable:
    def __init__(self) -> None:
        self.restarted = False
        self.weights = 0

    @endpoint
    def state(self) -> tuple[bool, int, int]:
        return self.restarted, self.weights, os.getpid()

    @endpoint
    def set_weights(self, w: int) -> None:
        self.weights = w

    @endpoint
    def die(self) -> None:
        os._exit(1)

    def on_restart(self) -> None:
        self.restarted = True


class Clash:
    @endpoint
    def shutdown(self) -> None:
        pass


class NoEndpoints:
    def run(self) -> None:
        pass


class Peer:
    """A member of a cross-mesh collective group."""

    def __init__(self, value: float) -> None:
        self.value = value

    @endpoint
    def broadcast_state(self, group: str, src: int, shapes: dict[str, list[int]]) -> dict[str, float]:
        handle = get_group(group)
        out = {}
        for name, shape in shapes.items():
            t = torch.full(shape, self.value) if handle.rank == src else torch.zeros(shape)
            handle.broadcast(t, src)
            out[name] = float(t.sum())
        return out

    @endpoint
    def all_reduce(self, group: str) -> float:
        t = torch.tensor([self.value])
        get_group(group).all_reduce(t)
        return float(t.item())

    @endpoint
    def torch_dist_all_reduce(self) -> float:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        return float(t.item())


class MeshCaller:
    """Holds a mesh it was given (it arrives attached) and calls it from its own process."""

    def __init__(self, mesh) -> None:
        self.mesh = mesh

    @endpoint
    async def sticky_pids(self, keys: list[str], calls: int) -> dict[str, list[int]]:
        pids: dict[str, list[int]] = {}
        for key in keys:
            for _ in range(calls):
                pids.setdefault(key, []).append((await self.mesh.whoami.options(route_key=key).choose())["pid"])
        return pids

    @endpoint
    def all_ranks(self) -> list[int]:
        return [who["rank"] for who in self.mesh.whoami.all().result()]

    @endpoint
    def stop(self) -> None:
        self.mesh.shutdown()
