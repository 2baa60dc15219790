"""This process's side of collective groups: a TCPStore and the backend's ProcessGroup per group, joined and left
by name, with every socket on bind_host(). The controller forms groups through rlmesh.mesh.collective."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import ray
import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


class CollectiveError(RuntimeError):
    """A collective group could not form, or one of its operations failed or timed out."""


@dataclass
class GroupHandle:
    """This process's membership in one collective group."""

    name: str
    backend: str
    rank: int
    world_size: int
    timeout: datetime.timedelta
    process_group: Any
    store: Any

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._wait(self.broadcast_async(tensor, src), "broadcast")
        return tensor

    def all_reduce(self, tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        self._wait(self.all_reduce_async(tensor, op), "all_reduce")
        return tensor

    def broadcast_async(self, tensor: torch.Tensor, src: int = 0) -> Any:
        """Start a broadcast and return its work handle (wait on it with a timeout, as `broadcast` does)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        return self.process_group.broadcast([tensor], opts)

    def all_reduce_async(self, tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> Any:
        """Start an all-reduce and return its work handle."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = op
        return self.process_group.allreduce([tensor], opts)

    def barrier(self) -> None:
        # A one-element all_reduce works on every backend and honours our timeout, unlike some barrier impls.
        device = "cuda" if self.backend == "nccl" else "cpu"
        self.all_reduce(torch.zeros(1, device=device))

    def _wait(self, work: Any, op: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as err:
            raise CollectiveError(
                f"{op} in collective group '{self.name}' (rank {self.rank} of {self.world_size}, {self.backend}) "
                f"failed or timed out after {self.timeout.total_seconds():.0f}s: {err}"
            ) from err


_groups: dict[str, GroupHandle] = {}
_pending_stores: dict[str, Any] = {}
_listeners: dict[int, socket.socket] = {}


def get_group(name: str) -> GroupHandle:
    """The calling actor's handle on collective group `name`."""
    if name not in _groups:
        raise CollectiveError(f"this actor is not in collective group {name!r}; it is in {sorted(_groups)}")
    return _groups[name]


def host_store(host: str, port: int, world_size: int, timeout: datetime.timedelta) -> Any:
    """A TCPStore server listening on `host` only. TCPStore binds every interface whatever host it is given, so the
    socket is bound here and handed over: on a local run nothing rlmesh opens is reachable from the network."""
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    store = dist.TCPStore(
        host,
        listener.getsockname()[1],
        world_size,
        is_master=True,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=listener.fileno(),
    )
    _listeners[id(store)] = listener  # the store serves on this socket's descriptor: keep it open while it lives
    return store


def gloo_options(listen_on: str, timeout: datetime.timedelta) -> Any:
    """ProcessGroupGloo options whose device listens on `listen_on` (by default gloo picks the address the machine's
    hostname resolves to, which can be a public interface)."""
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=listen_on)]
    return options


def open_store(name: str, world_size: int, timeout_s: float) -> tuple[str, int]:
    """Rank 0 hosts the group's TCPStore on a free port of bind_host() and reports where it listens."""
    host = bind_host()
    store = host_store(host, 0, world_size, datetime.timedelta(seconds=timeout_s))
    _pending_stores[name] = store
    return host, store.port


def join(
    name: str,
    backend: str,
    addr: str,
    port: int,
    rank: int,
    world_size: int,
    timeout_s: float,
    listen_on: str | None = None,
) -> None:
    """Join group `name`; `listen_on` is the address this process's gloo device listens on (default: bind_host();
    processes outside Ray, such as vLLM's workers, are told it)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        store = _pending_stores.pop(name)
    else:
        store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"rlmesh/{name}", store)
    if backend == "gloo":
        pg: Any = dist.ProcessGroupGloo(prefixed, rank, world_size, gloo_options(listen_on or bind_host(), timeout))
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    _groups[name] = GroupHandle(name, backend, rank, world_size, timeout, pg, store)


def leave(name: str) -> bool:
    """Leave group `name` (closing the store it hosted); False if this process was not in it."""
    handle = _groups.pop(name, None)
    pending = _pending_stores.pop(name, None)
    for store in (pending, handle.store if handle is not None else None):
        listener = _listeners.pop(id(store), None) if store is not None else None
        if listener is not None:
            listener.close()
    if handle is not None and handle.backend == "nccl":
        handle.process_group.shutdown()
    return handle is not None


BIND_HOST_ENV = "RLMESH_BIND_HOST"


def bind_host() -> str:
    """The address rlmesh's own sockets (stores, gloo devices) listen on: RLMESH_BIND_HOST if set (a local
    `python -m rlmesh.train` sets 127.0.0.1), else loopback while the cluster is this one node, else this node's
    address, for groups that span machines. (Ray 2.60 turns a loopback node address into the machine's public one,
    so Ray's own node address is not a safe default.)"""
    chosen = os.environ.get(BIND_HOST_ENV)
    if chosen:
        return chosen
    if sum(1 for node in ray.nodes() if node.get("Alive")) == 1:
        return "127.0.0.1"
    return node_ip()


def node_ip() -> str:
    """The address Ray knows this node by (the one given to ray.init), not a guess from the network interfaces."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return str(node["NodeManagerAddress"])
    return str(ray.util.get_node_ip_address())


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds `address` (e.g. 'lo' for 127.0.0.1), or None."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.address == address for entry in addresses):
            return str(name)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
