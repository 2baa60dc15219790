"""The trainer side of a weight sync: pack the full tensors into buckets as they are produced and send them."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from rlmesh.mesh.collective import CollectiveError, GroupHandle, get_group
from rlmesh.sync.buckets import pack
from rlmesh.sync.manifest import PlanMismatchError, SyncPlan
from rlmesh.sync.transports import make_sender


def send_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    plan: SyncPlan,
    group: GroupHandle | None,
    *,
    version: int,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Send one sync of `named_tensors` (full tensors, in plan order) to every receiver of `group`.

    Every trainer rank calls this in lockstep on its own `iter_full_weights()`, because gathering full tensors
    (FSDP2) is itself collective; rank 0 passes the weight-sync group and sends, the other ranks pass None and only
    iterate. Bucket k+1 is packed while bucket k travels. `version` is broadcast in the header, so receivers stamp
    exactly the version that was sent. `device` holds the bucket buffers: the current CUDA device for nccl and
    cuda_ipc, the CPU for gloo (the default). Returns bytes, buckets and seconds (0 on ranks that do not send).
    """
    started = time.perf_counter()
    if group is None:
        for _ in named_tensors:
            pass
        return {"bytes": 0.0, "buckets": 0.0, "seconds": time.perf_counter() - started}
    buffer_device = torch.device(device) if device is not None else _default_device(plan.transport)
    sender = make_sender(group, plan, buffer_device)
    skipped = set(plan.skipped)
    buckets = plan.buckets()
    sent = 0
    bucket = 0
    waiting = len(buckets[0])
    try:
        sender.start(version)
        buffer = None
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name in skipped:
                    continue
                slot = plan.check_tensor(sent, name, tensor)
                sent += 1
                waiting -= 1
                alone = len(buckets[bucket]) == 1 and slot.wire_dtype == slot.source_dtype
                if not (alone and sender.send_tensor(bucket, tensor)):
                    if buffer is None:
                        buffer = sender.buffer_for(bucket)
                    pack(buffer, slot, tensor)
                    if waiting == 0:
                        sender.send(bucket)
                if waiting == 0:
                    bucket += 1
                    buffer = None
                    if bucket < len(buckets):
                        waiting = len(buckets[bucket])
        if sent != len(plan.slots):
            missing = [slot.source_name for slot in plan.slots[sent:]]
            raise PlanMismatchError(
                f"the sender stopped after {sent} of {len(plan.slots)} planned tensors; missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}"
            )
        sender.finish()
    except BaseException:
        sender.abort()
        # The other trainer ranks gather these tensors with this one (FSDP2): run the iterator to its end, or they
        # would wait in the next gather until the trainer's own timeout.
        for _ in named_tensors:
            pass
        raise
    return {
        "bytes": float(plan.total_bytes),
        "buckets": float(plan.num_buckets),
        "seconds": time.perf_counter() - started,
    }


def member_group(name: str) -> GroupHandle | None:
    """This process's handle on weight-sync group `name`, or None where it is not a member (trainer ranks > 0)."""
    try:
        return get_group(name)
    except CollectiveError:
        return None


def _default_device(transport: str) -> torch.device:
    if transport in ("nccl", "cuda_ipc"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
