"""Benchmark the mesh against raw Ray in one run: all, choose, shard, and routing quality.

Prints medians and ratios (rlmesh / raw). Run: python scripts/bench_mesh.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

from rlmesh.mesh import ActorMesh, endpoint, wait_all


class Server:
    @endpoint
    def noop(self) -> None:
        return None

    @endpoint
    def consume(self, batch: torch.Tensor | np.ndarray) -> int:
        return int(batch.shape[0])

    @endpoint
    def serve(self, seconds: float) -> None:
        time.sleep(seconds)  # one call at a time per actor: a single-server queue, as an engine at capacity


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired(raw: Callable[[], object], mesh: Callable[[], object], rounds: int, repeats: int) -> tuple[float, float]:
    """Alternate the two sides so drift on a noisy machine hits both; return the medians of the round medians."""
    raw_t, mesh_t = [], []
    for _ in range(rounds):
        raw_t.append(median_time(raw, repeats))
        mesh_t.append(median_time(mesh, repeats))
    return statistics.median(raw_t), statistics.median(mesh_t)


def row(name: str, raw: float, ours: float, unit: str, target: str) -> None:
    print(f"{name:<44} {raw * 1e3:>10.3f} {ours * 1e3:>10.3f}  {ours / raw:>6.2f}x  {unit:<10} target {target}")


def bench_calls(quick: bool) -> None:
    mesh = ActorMesh(Server, 8, resources={"CPU": 0.1}, name="bench")
    handles = mesh.actors
    rounds, repeats = (3, 50) if quick else (7, 200)

    def raw_all() -> None:
        ray.get([h.noop.remote() for h in handles])

    def mesh_all() -> None:
        mesh.noop.all().result()

    print(f"{'':<44} {'raw ms':>10} {'rlmesh ms':>10}  {'ratio':>7}")
    row("all() on 8 actors, per call", *paired(raw_all, mesh_all, rounds, repeats), "", "<= 1.15x")

    # The same actors on both sides: eight actor processes on two cores wake more slowly than one kept hot, which
    # would be charged to the mesh if its calls rotated over eight while raw Ray's hit one.
    single = ActorMesh(Server, 1, resources={"CPU": 0.1}, name="single")
    fixed = single.actors[0]
    rotation = itertools.cycle(handles)

    def raw_one() -> None:
        ray.get(fixed.noop.remote())

    def mesh_one() -> None:
        single.noop.choose().result()

    row("choose() round trip, 1 actor, vs raw .remote()", *paired(raw_one, mesh_one, rounds, repeats), "", "<= 1.2x")

    def raw_rotating() -> None:
        ray.get(next(rotation).noop.remote())

    def mesh_rotating() -> None:
        mesh.noop.choose().result()

    row(
        "choose() round trip, 8 actors, vs raw rotating",
        *paired(raw_rotating, mesh_rotating, rounds, repeats),
        "",
        "<= 1.2x",
    )

    n = 1000 if quick else 3000

    def raw_pipe() -> None:
        ray.get([next(rotation).noop.remote() for _ in range(n)])

    def mesh_pipe() -> None:
        wait_all([mesh.noop.choose() for _ in range(n)])

    pushed = ActorMesh(Server, 8, resources={"CPU": 0.1}, name="pushed", max_in_flight_per_actor=None)
    pushed_rotation = itertools.cycle(pushed.actors)

    def raw_pushed_pipe() -> None:  # raw Ray on the push mesh's own actors
        ray.get([next(pushed_rotation).noop.remote() for _ in range(n)])

    def push_pipe() -> None:
        wait_all([pushed.noop.choose() for _ in range(n)])

    raw_p, mesh_p = paired(raw_pushed_pipe, push_pipe, rounds, 1)
    row(f"choose() pipelined, {n} calls, push", raw_p, mesh_p, "", "<= 1.2x")
    print(f"{'  throughput, push':<44} {n / raw_p:>10.0f} {n / mesh_p:>10.0f}  calls/s   target >= 3000/s")
    # Pull (the default for one-call-at-a-time actors) holds two calls per actor: right for calls of uneven length
    # (the routing table below), at a cost for sub-millisecond ones, whose actors idle between hand-offs.
    raw_p, mesh_p = paired(raw_pipe, mesh_pipe, rounds, 1)
    row(f"choose() pipelined, {n} calls, pull (default)", raw_p, mesh_p, "", "")
    print(f"{'  throughput, pull (default)':<44} {n / raw_p:>10.0f} {n / mesh_p:>10.0f}  calls/s")
    pushed.shutdown()
    single.shutdown()
    mesh.shutdown()


def bench_shard(quick: bool) -> None:
    mesh = ActorMesh(Server, 4, resources={"CPU": 0.1}, name="shard")
    handles = mesh.actors
    rows = (64 if quick else 256) * 1024 * 1024 // 4 // 256  # a [rows, 256] float32 batch of 64/256 MB
    batch = torch.randn(rows, 256)

    def raw_shard() -> None:
        # The fastest raw Ray path: one ray.put per shard of numpy views (out-of-band, no torch storage copy).
        refs = [ray.put(part.numpy()) for part in batch.chunk(4)]
        ray.get([h.consume.remote(r) for h, r in zip(handles, refs, strict=True)])

    def mesh_shard() -> None:
        mesh.consume.shard(batch).result()

    raw, ours = paired(raw_shard, mesh_shard, 3 if quick else 5, 3)
    row(f"shard() {batch.numel() * 4 >> 20} MB tensor over 4 actors", raw, ours, "", "<= 1.2x")
    gbytes = batch.numel() * 4 / 1e9
    print(f"{'  effective GB/s (raw, rlmesh)':<44} {gbytes / raw:>10.2f} {gbytes / ours:>10.2f}")
    mesh.shutdown()


def greedy_bound(durations: list[float], actors: int) -> tuple[float, float]:
    """Offline: the lower bound max(sum/actors, max) and greedy list scheduling of the known durations."""
    heap = [0.0] * actors
    for d in durations:
        heapq.heappush(heap, heapq.heappop(heap) + d)
    return max(sum(durations) / actors, max(durations)), max(heap)


async def closed_loop(mesh: ActorMesh[Server], durations: list[float], window: int) -> None:
    """A controller that keeps at most `window` calls outstanding, issuing the next as soon as any finishes."""
    slots = asyncio.Semaphore(window)

    async def one(seconds: float) -> None:
        async with slots:
            await mesh.serve.choose(seconds)

    await asyncio.gather(*(one(d) for d in durations))


async def raw_pull(handles: list, durations: list[float], window: int) -> None:
    """Raw Ray's online pull schedule: two workers per actor (one call running, the next already there), each taking
    the next duration as soon as its call returns; the gap to the offline bound is then Ray's per-call cost here."""
    todo = iter(durations)

    async def worker(handle: Any) -> None:
        for seconds in todo:
            await handle.serve.remote(seconds)

    workers = [h for h in handles for _ in range(2)][:window]
    await asyncio.gather(*(worker(h) for h in workers))


def bench_routing(quick: bool) -> None:
    actors, calls = 8, (600 if quick else 2000)
    rng = np.random.default_rng(0)
    # mean 20 ms: long enough that the ~1 ms per-call cost on 2 loaded cores does not hide the routing
    mean_s = 0.020
    durations = list(rng.lognormal(0.0, 1.0, calls) * mean_s / np.exp(0.5))
    bound, greedy = greedy_bound(durations, actors)
    print(
        f"\nrouting: {actors} single-server actors, {calls} calls, lognormal(sigma=1) durations, total work "
        f"{sum(durations):.2f}s; offline bound {bound:.3f}s, greedy list scheduling {greedy:.3f}s"
    )
    push = {"max_in_flight_per_actor": None}
    configs: list[tuple[str, dict]] = [
        ("random, push", {"router": "random", **push}),
        ("round_robin, push", {"router": "round_robin", **push}),
        ("least_loaded, push", {"router": "least_loaded", **push}),
        ("power_of_two, push", {"router": "power_of_two", **push}),
        ("power_of_two, pull cap 1", {"router": "power_of_two", "max_in_flight_per_actor": 1}),
        ("power_of_two, pull (default)", {}),
    ]
    windows = {"all at once": calls, "window 16 (2/actor)": 16}
    print(f"{'router':<34}" + "".join(f"{w:>26}" for w in windows))
    results: dict[str, dict[str, float]] = {}

    def measure(name: str, run: Callable[[ActorMesh[Server], int], Any], options: dict) -> None:
        mesh = ActorMesh(Server, actors, resources={"CPU": 0.1}, name="route", **options)
        mesh.noop.all().result()
        results[name] = {}
        for wname, window in windows.items():
            t0 = time.perf_counter()
            asyncio.run(run(mesh, window))
            results[name][wname] = time.perf_counter() - t0
        mesh.shutdown()
        cells = "".join(f"{results[name][w]:>9.3f}s {results[name][w] / bound:>5.2f}xLB" for w in windows)
        print(f"{name:<34}{cells}")

    measure("raw Ray pull (floor)", lambda mesh, window: raw_pull(mesh.actors, durations, window), {})
    for name, options in configs:
        measure(name, lambda mesh, window: closed_loop(mesh, durations, window), options)
    for wname in windows:
        default, push_p2, rand = (
            results[name][wname] for name in ("power_of_two, pull (default)", "power_of_two, push", "random, push")
        )
        print(
            f"{wname}: default/bound {default / bound:.2f} (target <= 1.15), default/raw pull floor "
            f"{default / results['raw Ray pull (floor)'][wname]:.2f}, default/push {default / push_p2:.2f}, "
            f"default/random {default / rand:.2f} (target <= 0.75)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes")
    parser.add_argument("--only", choices=["calls", "shard", "routing"], help="run one part")
    args = parser.parse_args()
    ray.init(num_cpus=16, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        for part, bench in (("calls", bench_calls), ("shard", bench_shard), ("routing", bench_routing)):
            if args.only in (None, part):
                bench(args.quick)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
