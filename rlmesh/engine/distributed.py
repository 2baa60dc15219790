"""The data-parallel process group of a training mesh: joining it, this actor's rank, reductions, seeding."""

from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from rlmesh.engine.devices import resolve_device
from rlmesh.mesh import current_rank

# A collective that waits longer than this raises instead of hanging the run (torch's own default is 30 minutes).
DIST_TIMEOUT_S = 600


def dp_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of this actor in its mesh; (0, 1) outside a mesh, e.g. in a test or a notebook."""
    try:
        place = current_rank()
    except RuntimeError:
        return 0, 1
    return place.rank, place.world_size


def init_distributed(device: str) -> tuple[int, int]:
    """Join the mesh's torch.distributed default group (gloo on CPU, nccl on CUDA) when it has several actors.

    Rendezvous through RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, which an ActorMesh sets in every actor. Returns
    (rank, world size); with one actor no group is made and every collective below is skipped.
    """
    rank, world_size = dp_rank_and_size()
    if world_size == 1 or dist.is_initialized():
        return rank, world_size
    from rlmesh.mesh.collective import bind_host, host_store, interface_of

    timeout = timedelta(seconds=DIST_TIMEOUT_S)
    # The store on rank 0's node address only (torch's env:// store listens on every interface), and gloo's device
    # on this node's interface (by default gloo takes whatever the hostname resolves to).
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank == 0:
        store = host_store(host, port, world_size, timeout)
    else:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    interface = interface_of(bind_host())
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    options: dict[str, Any] = {"timeout": timeout, "store": store}
    if device == "cuda":
        options["device_id"] = resolve_device(device)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size, **options)
    return rank, world_size


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    # NCCL reduces GPU tensors only; gloo reduces CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum over the data-parallel ranks, returned on the device `values` is on; a no-op without a process group."""
    if not is_distributed():
        return values
    summed = values.to(_collective_device())
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(values.device)


def all_reduce_max(value: int) -> int:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's `random` and numpy's global generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
