"""The vLLM worker extension (worker_extension_cls): join the weight-sync group, receive a sync, load it in place."""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from rlmesh.mesh import process_groups
from rlmesh.sync.buckets import unpack
from rlmesh.sync.manifest import SyncPlan
from rlmesh.sync.transports import WeightSyncError, make_receiver, process_group_backend
from rlmesh.sync.vllm_load import InPlaceLoader

WORKER_EXTENSION = "rlmesh.sync.vllm_worker.WeightSyncWorker"


def join_request(
    name: str, transport: str, addr: str, port: int, first_rank: int, world_size: int, timeout_s: float, plan: str
) -> str:
    """What an engine's workers join a weight-sync group with (`rlmesh_join_weight_group`), as JSON: it crosses
    vLLM's collective_rpc unchanged. `plan` is SyncPlan.to_json()."""
    return json.dumps(
        {
            "name": name,
            "transport": transport,
            "addr": addr,
            "port": port,
            "first_rank": first_rank,
            "world_size": world_size,
            "timeout_s": timeout_s,
            "plan": plan,
        }
    )


class WeightSyncWorker:
    """Mixed into every vLLM worker of an engine; the rollout actor calls these through `collective_rpc`.

    One rpc per engine per sync: `rlmesh_receive_weights` receives every bucket over the group and loads them,
    so no tensor ever travels through the RPC layer (which turns tensors into lists).
    """

    # Set by vLLM's Worker, which this class is mixed into.
    rank: int
    device: torch.device
    model_runner: Any
    vllm_config: Any

    def rlmesh_device_info(self) -> dict[str, Any]:
        """This worker's rank in its engine and its device (with the GPU's UUID, to check cuda_ipc colocation)."""
        device = torch.device(self.device)
        uuid = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
        return {"rank": self.rank, "device": str(device), "uuid": uuid}

    def rlmesh_join_weight_group(self, request: str) -> int:
        """Join the group described by `request` (JSON: name, transport, addr, port, first_rank, world_size,
        timeout_s, plan) at rank first_rank + this worker's rank in its engine; keep the plan for its syncs."""
        spec = json.loads(request)
        rank = int(spec["first_rank"]) + self.rank
        backend = process_group_backend(spec["transport"])
        process_groups.join(
            spec["name"],
            backend,
            spec["addr"],
            int(spec["port"]),
            rank,
            int(spec["world_size"]),
            spec["timeout_s"],
            listen_on=spec.get("listen_on") or spec["addr"],
        )
        self._rlmesh_plans()[spec["name"]] = SyncPlan.from_json(spec["plan"])
        return rank

    def rlmesh_leave_weight_group(self, name: str) -> bool:
        self._rlmesh_plans().pop(name, None)
        try:
            return process_groups.leave(name)
        except Exception:  # an NCCL group whose peer died may fail to shut down cleanly; it is gone either way
            return True

    def rlmesh_receive_weights(self, name: str) -> dict[str, Any]:
        """Receive one sync over group `name` and load it in place; returns the version the sender stamped."""
        plans = self._rlmesh_plans()
        if name not in plans:
            raise WeightSyncError(f"this engine worker (rank {self.rank}) has not joined weight-sync group {name!r}")
        plan = plans[name]
        group = process_groups.get_group(name)
        started = time.perf_counter()
        device = torch.device(self.device)
        # gloo moves host memory: its buckets land in CPU buffers, and loading copies them to a GPU engine's device.
        receive_on = torch.device("cpu") if plan.transport == "gloo" else device
        receiver = make_receiver(group, plan, receive_on)
        version = receiver.start()
        model = self.model_runner.get_model()
        loader = InPlaceLoader(model, repack=device.type == "cpu")
        from vllm.config import set_current_vllm_config

        self._rlmesh_state()["consistent"] = False  # until the last bucket has landed and been packed
        waited = 0.0
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            loader.begin()
            mark = time.perf_counter()
            for k, buffer in receiver.buckets():
                waited += time.perf_counter() - mark
                loader.load(unpack(buffer, plan.bucket(k)))
                mark = time.perf_counter()
            loader.finish()
        state = self._rlmesh_state()
        state.update(consistent=True, version=version)
        seconds = time.perf_counter() - started
        return {"version": version, "seconds": seconds, "wait_seconds": waited, "bytes": plan.total_bytes}

    def rlmesh_weight_state(self) -> dict[str, Any]:
        """The last version loaded, and whether the weights are whole (False after a sync that failed midway)."""
        return dict(self._rlmesh_state())

    def _rlmesh_plans(self) -> dict[str, SyncPlan]:
        plans = self.__dict__.setdefault("_rlmesh_plan_by_group", {})
        assert isinstance(plans, dict)
        return plans

    def _rlmesh_state(self) -> dict[str, Any]:
        state = self.__dict__.setdefault("_rlmesh_weight_state", {"version": 0, "consistent": True})
        assert isinstance(state, dict)
        return state
