"""Bucketed sync over a real gloo group between threads: exact delivery, version and plan checks, deadlines."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from rlmesh.mesh.collective import GroupHandle
from rlmesh.sync.buckets import unpack
from rlmesh.sync.manifest import SyncPlan, tensor_specs
from rlmesh.sync.sender import send_weights
from rlmesh.sync.transports import WeightSyncError, make_receiver


def gloo_group(world: int, timeout_s: float) -> list[GroupHandle]:
    """`world` members of one gloo group in this process (one per thread), like a trainer and its engines."""
    timeout = datetime.timedelta(seconds=timeout_s)
    master = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
    stores = [master] + [dist.TCPStore("127.0.0.1", master.port, world, timeout=timeout) for _ in range(world - 1)]
    groups: list[Any] = [None] * world

    def join(rank: int) -> None:
        pg = dist.ProcessGroupGloo(dist.PrefixStore("t", stores[rank]), rank, world, timeout)
        groups[rank] = GroupHandle("test", "gloo", rank, world, timeout, pg, stores[rank])

    run_all([lambda r=r: join(r) for r in range(world)])
    return groups


def run_all(jobs: list[Callable[[], Any]], timeout_s: float = 60) -> list[Any]:
    results: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return results


def receive_all(group: GroupHandle, plan: SyncPlan) -> tuple[int, dict[str, torch.Tensor]]:
    receiver = make_receiver(group, plan, torch.device("cpu"))
    version = receiver.start()
    got = {}
    for k, buffer in receiver.buckets():
        got.update({name: t.clone() for name, t in unpack(buffer, plan.bucket(k))})
    return version, got


def test_every_receiver_gets_every_tensor_exactly_over_several_buckets(monkeypatch):
    import rlmesh.sync.sender as sender_module

    packed: list[str] = []
    real_pack = sender_module.pack
    monkeypatch.setattr(sender_module, "pack", lambda buf, slot, t: (packed.append(slot.name), real_pack(buf, slot, t)))
    torch.manual_seed(0)
    tensors = {f"model.layers.{i}.w": torch.randn(64, 33) for i in range(9)}
    tensors["model.step"] = torch.arange(3)
    tensors["model.embed.weight"] = torch.randn(100, 64)  # larger than a bucket: sent from its own memory
    tensors["model.head_t.weight"] = torch.randn(64, 100).t()  # alone in a bucket but not contiguous: packed
    tensors["model.norm.weight"] = torch.randn(64)
    plan = SyncPlan.build(tensor_specs(tensors.items()), bucket_bytes=20_000)
    assert plan.num_buckets >= 6  # double buffering is exercised on both sides
    assert len(plan.bucket(plan.slots[10].bucket)) == 1 and len(plan.bucket(plan.slots[11].bucket)) == 1
    groups = gloo_group(3, timeout_s=20)
    sent, *received = run_all(
        [lambda: send_weights(tensors.items(), plan, groups[0], version=7)]
        + [lambda g=g: receive_all(g, plan) for g in groups[1:]]
    )
    assert sent["bytes"] == plan.total_bytes and sent["buckets"] == plan.num_buckets
    assert "model.embed.weight" not in packed and "model.head_t.weight" in packed
    for version, got in received:
        assert version == 7
        assert got.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert torch.equal(got[name], tensor), name


def test_ranks_that_do_not_send_only_iterate():
    seen = []
    stats = send_weights(((n, seen.append(n) or torch.zeros(1)) for n in "abc"), None, None, version=1)  # type: ignore[arg-type]
    assert seen == ["a", "b", "c"] and stats["bytes"] == 0


def test_a_receiver_with_another_plan_fails_at_the_header():
    tensors = {"w": torch.randn(8)}
    plan = SyncPlan.build(tensor_specs(tensors.items()), bucket_bytes=1024)
    other = SyncPlan.build([("w", "float32", (9,))], bucket_bytes=1024)
    groups = gloo_group(2, timeout_s=1)
    _, err = run_all(
        [lambda: send_weights(tensors.items(), plan, groups[0], version=1), lambda: receive_all(groups[1], other)]
    )
    assert isinstance(err, WeightSyncError) and "differs from this receiver's" in str(err)


def test_a_missing_receiver_fails_the_sender_within_the_timeout_naming_the_group():
    tensors = {"w": torch.randn(1000)}
    plan = SyncPlan.build(tensor_specs(tensors.items()), bucket_bytes=1024)
    groups = gloo_group(2, timeout_s=2)
    started = time.monotonic()
    expected = r"weight-sync group 'test' \(rank 0 of 2, gloo\).*timed out \(deadline 2s\)"
    with pytest.raises(WeightSyncError, match=expected):
        send_weights(tensors.items(), plan, groups[0], version=1)
    assert time.monotonic() - started < 10


def test_a_failed_sender_still_runs_its_tensors_to_the_end_for_ranks_gathering_with_it():
    tensors = {f"w{i}": torch.randn(300) for i in range(4)}
    plan = SyncPlan.build(tensor_specs(tensors.items()), bucket_bytes=1024)
    groups = gloo_group(2, timeout_s=1)
    produced = []

    def gathered():  # FSDP2's iterator: each tensor is an all-gather that the other ranks join too
        for name, tensor in tensors.items():
            produced.append(name)
            yield name, tensor

    with pytest.raises(WeightSyncError):  # nobody receives
        send_weights(gathered(), plan, groups[0], version=1)
    assert produced == list(tensors)


def test_a_sender_yielding_fewer_tensors_than_planned_is_an_error():
    plan = SyncPlan.build([("a", "float32", (4,)), ("b", "float32", (4,))], bucket_bytes=64)
    groups = gloo_group(2, timeout_s=1)
    err, _ = run_all(
        [
            lambda: send_weights([("a", torch.zeros(4))], plan, groups[0], version=1),
            lambda: receive_all(groups[1], plan),
        ]
    )
    assert isinstance(err, ValueError) and "stopped after 1 of 2 planned tensors; missing ['b']" in str(err)
