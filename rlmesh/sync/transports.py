"""Bucket transports: broadcast over gloo or NCCL, or CUDA IPC buffers signalled over gloo; every wait has a deadline.

One sync, as every member sees it:
  header   the sender broadcasts [magic, plan fingerprint, version, buckets]; receivers check it against their plan
  buckets  broadcast: bucket k travels while the sender packs k+1 and receivers load k-1 (two buffers each side)
           cuda_ipc: the sender packs k into one of two shared CUDA buffers, then a barrier says "k is ready, and
           every receiver has finished k-1", so it packs k+1 while receivers copy k in
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from typing import Any

import torch

from rlmesh.mesh.collective import GroupHandle
from rlmesh.sync.buckets import allocate_buffers
from rlmesh.sync.manifest import SyncPlan

HEADER_MAGIC = 0x524C4D53  # 'RLMS'
ABORT = 1  # a barrier value: the sender gave up mid-sync


class WeightSyncError(RuntimeError):
    """A weight sync failed: a peer is missing or died, a wait timed out, or sender and receiver disagree."""


def process_group_backend(transport: str) -> str:
    """The process-group backend a transport runs on: cuda_ipc moves data through shared memory and only
    signals over gloo."""
    return "nccl" if transport == "nccl" else "gloo"


def wait_work(work: Any, group: GroupHandle, what: str) -> None:
    """Wait for an async collective up to the group's timeout; raise WeightSyncError naming the group and rank.

    With a timeout given, torch's NCCL work blocks the CPU thread until done or timed out, like gloo's."""
    try:
        work.wait(group.timeout)
    except Exception as err:
        raise WeightSyncError(
            f"{what} in weight-sync group '{group.name}' (rank {group.rank} of {group.world_size}, {group.backend}) "
            f"failed or timed out (deadline {group.timeout.total_seconds():.0f}s): a peer is missing or died "
            f"(the controller's error names which). Cause: {str(err).splitlines()[0][:300] if str(err) else err!r}"
        ) from err


def _barrier(group: GroupHandle, flag: int, what: str) -> int:
    """All-reduce one int over the group (a barrier that also carries an abort flag); returns the sum."""
    value = torch.tensor([flag], dtype=torch.int64)
    wait_work(group.all_reduce_async(value), group, what)
    return int(value.item())


def _header_device(group: GroupHandle, device: torch.device) -> torch.device:
    return device if group.backend == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------- sender side


class BucketSender:
    """Sends one sync's buckets. Use: start(version); for each bucket k in order: pack into buffer_for(k), then
    send(k); finish()."""

    def __init__(self, group: GroupHandle, plan: SyncPlan, device: torch.device) -> None:
        self.group, self.plan, self.device = group, plan, device

    def start(self, version: int) -> None:
        header = torch.tensor(
            [HEADER_MAGIC, self.plan.fingerprint, version, self.plan.num_buckets],
            dtype=torch.int64,
            device=_header_device(self.group, self.device),
        )
        wait_work(self.group.broadcast_async(header), self.group, "sending the sync header")

    def buffer_for(self, bucket: int) -> torch.Tensor:
        raise NotImplementedError

    def send(self, bucket: int) -> None:
        raise NotImplementedError

    def send_tensor(self, bucket: int, tensor: torch.Tensor) -> bool:
        """Send a bucket holding only `tensor` straight from its memory, without packing; False if this transport
        cannot (the caller then packs it)."""
        return False

    def finish(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Best effort after a sender-side error; receivers otherwise fail at their timeout."""


class BroadcastSender(BucketSender):
    """gloo or NCCL broadcast from rank 0. Two buffers: bucket k+1 is packed while bucket k is in flight."""

    def __init__(self, group: GroupHandle, plan: SyncPlan, device: torch.device) -> None:
        super().__init__(group, plan, device)
        self.buffers = allocate_buffers(plan.max_bucket_size, min(2, plan.num_buckets), device)
        self.in_flight: list[Any] = [None] * len(self.buffers)

    def buffer_for(self, bucket: int) -> torch.Tensor:
        slot = bucket % len(self.buffers)
        if self.in_flight[slot] is not None:
            wait_work(self.in_flight[slot], self.group, f"broadcasting bucket {bucket - len(self.buffers)}")
            self.in_flight[slot] = None
        return self.buffers[slot]

    def send(self, bucket: int) -> None:
        slot = bucket % len(self.buffers)
        # NCCL orders the broadcast after the packing copies on the current stream; gloo packing is synchronous.
        self.in_flight[slot] = self.group.broadcast_async(self.buffers[slot][: self.plan.bucket_sizes[bucket]])

    def send_tensor(self, bucket: int, tensor: torch.Tensor) -> bool:
        # A tensor alone in its bucket (often one larger than a bucket, like an embedding) travels from its own
        # memory when it already is what the receiver expects: one copy fewer of its bytes.
        if not tensor.is_contiguous() or tensor.device != self.device:
            return False
        if tensor.numel() * tensor.element_size() != self.plan.bucket_sizes[bucket]:
            return False
        slot = bucket % len(self.buffers)
        if self.in_flight[slot] is not None:
            wait_work(self.in_flight[slot], self.group, f"broadcasting bucket {bucket - len(self.buffers)}")
        flat = tensor.detach().reshape(-1).view(torch.uint8)
        self.in_flight[slot] = _Sending(self.group.broadcast_async(flat), flat)  # keeps the tensor alive meanwhile
        return True

    def finish(self) -> None:
        for slot, work in enumerate(self.in_flight):
            if work is not None:
                wait_work(work, self.group, "broadcasting the last buckets")
                self.in_flight[slot] = None


class _Sending:
    """A work handle that holds the tensor it sends."""

    def __init__(self, work: Any, tensor: torch.Tensor) -> None:
        self.work, self.tensor = work, tensor

    def wait(self, timeout: Any) -> Any:
        return self.work.wait(timeout)


class IpcSender(BucketSender):
    """CUDA IPC: two CUDA buffers shared with receivers on the same GPU; a gloo barrier per bucket."""

    def __init__(self, group: GroupHandle, plan: SyncPlan, device: torch.device) -> None:
        if device.type != "cuda":
            raise WeightSyncError(f"cuda_ipc needs the sender's weights on a CUDA device, got {device}; use gloo")
        super().__init__(group, plan, device)
        self.buffers = allocate_buffers(plan.max_bucket_size, min(2, plan.num_buckets), device)

    def start(self, version: int) -> None:
        super().start(version)
        from torch.multiprocessing.reductions import reduce_tensor

        # The handles travel per sync, over the group, so the buffers live only during a sync: a colocated
        # trainer gets that memory back between syncs.
        handles = [reduce_tensor(buffer)[1] for buffer in self.buffers]
        payload = pickle.dumps({"uuid": _device_uuid(self.device), "handles": handles})
        _broadcast_bytes(self.group, payload, "sending CUDA IPC handles")

    def buffer_for(self, bucket: int) -> torch.Tensor:
        # The barrier of bucket k-1 proved every receiver finished bucket k-2, the last user of this buffer.
        return self.buffers[bucket % len(self.buffers)]

    def send(self, bucket: int) -> None:
        torch.cuda.current_stream(self.device).synchronize()
        if _barrier(self.group, 0, f"signalling bucket {bucket}") != 0:
            raise WeightSyncError(f"a receiver aborted the sync at bucket {bucket} of group '{self.group.name}'")

    def finish(self) -> None:
        _barrier(self.group, 0, "waiting for receivers to finish the last bucket")
        self.buffers.clear()

    def abort(self) -> None:
        with contextlib.suppress(WeightSyncError):
            _barrier(self.group, ABORT, "aborting the sync")


def make_sender(group: GroupHandle, plan: SyncPlan, device: torch.device) -> BucketSender:
    if plan.transport == "cuda_ipc":
        return IpcSender(group, plan, device)
    return BroadcastSender(group, plan, device)


# ---------------------------------------------------------------- receiver side


class BucketReceiver:
    """Receives one sync. Use: version = start(); for k, buffer in buckets(): consume buffer before the next step."""

    def __init__(self, group: GroupHandle, plan: SyncPlan, device: torch.device) -> None:
        self.group, self.plan, self.device = group, plan, device

    def start(self) -> int:
        header = torch.zeros(4, dtype=torch.int64, device=_header_device(self.group, self.device))
        wait_work(self.group.broadcast_async(header), self.group, "receiving the sync header")
        magic, fingerprint, version, buckets = (int(v) for v in header.tolist())
        if magic != HEADER_MAGIC:
            raise WeightSyncError(
                f"weight-sync group '{self.group.name}': the header starts with {magic:#x}, not {HEADER_MAGIC:#x}; "
                "sender and receivers are out of step (a previous sync failed?): rebuild the group"
            )
        if fingerprint != self.plan.fingerprint or buckets != self.plan.num_buckets:
            raise WeightSyncError(
                f"weight-sync group '{self.group.name}': the sender's plan (fingerprint {fingerprint:#x}, {buckets} "
                f"buckets) differs from this receiver's ({self.plan.fingerprint:#x}, {self.plan.num_buckets}); "
                "receivers must take the plan the controller sent with the group"
            )
        return version

    def buckets(self) -> Iterator[tuple[int, torch.Tensor]]:
        raise NotImplementedError


class BroadcastReceiver(BucketReceiver):
    """Receives bucket k+1 while the caller loads bucket k."""

    def buckets(self) -> Iterator[tuple[int, torch.Tensor]]:
        n = self.plan.num_buckets
        buffers = allocate_buffers(self.plan.max_bucket_size, min(2, n), self.device)
        sizes = self.plan.bucket_sizes

        def post(k: int) -> Any:
            return self.group.broadcast_async(buffers[k % len(buffers)][: sizes[k]])

        pending = post(0)
        for k in range(n):
            # The caller has finished bucket k-1 (this generator resumed), so its buffer can take bucket k+1.
            following = post(k + 1) if k + 1 < n else None
            wait_work(pending, self.group, f"receiving bucket {k} of {n}")
            yield k, buffers[k % len(buffers)][: sizes[k]]
            pending = following


class IpcReceiver(BucketReceiver):
    """Opens the sender's CUDA buffers and copies each bucket out after its barrier."""

    def buckets(self) -> Iterator[tuple[int, torch.Tensor]]:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        payload = pickle.loads(_broadcast_bytes(self.group, b"", "receiving CUDA IPC handles"))
        local_index = _local_index_of(payload["uuid"], self.group)
        buffers = []
        for args in payload["handles"]:
            args = list(args)
            args[6] = local_index  # storage_device: the sender's index may differ when CUDA_VISIBLE_DEVICES does
            buffers.append(rebuild_cuda_tensor(*args))
        sizes = self.plan.bucket_sizes
        try:
            for k in range(self.plan.num_buckets):
                if _barrier(self.group, 0, f"waiting for bucket {k}") != 0:
                    raise WeightSyncError(f"a member of group '{self.group.name}' aborted the sync at bucket {k}")
                yield k, buffers[k % len(buffers)][: sizes[k]]
                torch.cuda.current_stream(self.device).synchronize()  # the copies out of the shared buffer are done
        except GeneratorExit:
            raise
        except BaseException:
            _barrier_quietly(self.group)
            raise
        finally:
            buffers.clear()
        _barrier(self.group, 0, "confirming the last bucket")


def make_receiver(group: GroupHandle, plan: SyncPlan, device: torch.device) -> BucketReceiver:
    if plan.transport == "cuda_ipc":
        return IpcReceiver(group, plan, device)
    return BroadcastReceiver(group, plan, device)


# ---------------------------------------------------------------- helpers


def _broadcast_bytes(group: GroupHandle, payload: bytes, what: str) -> bytes:
    """Broadcast a byte string from rank 0 over a gloo group: its length, then its bytes."""
    length = torch.tensor([len(payload)], dtype=torch.int64)
    wait_work(group.broadcast_async(length), group, what)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if group.rank == 0 else None
    if data is None:
        data = torch.empty(int(length.item()), dtype=torch.uint8)
    wait_work(group.broadcast_async(data), group, what)
    return data.numpy().tobytes()


def _barrier_quietly(group: GroupHandle) -> None:
    with contextlib.suppress(WeightSyncError):
        _barrier(group, ABORT, "aborting the sync")


def _device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def _local_index_of(uuid: str, group: GroupHandle) -> int:
    visible = [_device_uuid(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    if uuid not in visible:
        raise WeightSyncError(
            f"cuda_ipc in group '{group.name}': the sender's GPU {uuid} is not visible to receiver rank {group.rank} "
            f"(it sees {visible}); cuda_ipc needs the trainer and the engine on the same GPU, use nccl otherwise"
        )
    return visible.index(uuid)
