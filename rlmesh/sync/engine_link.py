"""The object-store transport's last hop: weights read inside an engine's actor go on to its workers over a gloo group
local to that actor, through the same bucketed path and in-place load as a collective sync (tensors cannot travel by
rpc to vLLM's worker processes)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from rlmesh.mesh import process_groups
from rlmesh.sync.collective_sync import sync_backstop_s
from rlmesh.sync.manifest import SyncPlan, tensor_specs
from rlmesh.sync.sender import send_weights
from rlmesh.sync.vllm_worker import join_request


class EngineLink:
    """A gloo group of the engine's actor (rank 0) and the engine's workers, formed for the weights' layout and kept
    while the layout stays the same. The callables are the actor's own: how many workers its engine has, and its
    join / receive / leave steps for a weight-sync group."""

    def __init__(
        self,
        *,
        worker_count: Callable[[], Awaitable[int]],
        join_workers: Callable[[str], Awaitable[list[int]]],
        receive: Callable[[str, float], Awaitable[dict[str, float]]],
        leave_workers: Callable[[str], Awaitable[None]],
        bucket_mb: float,
        timeout_s: float,
        tie_word_embeddings: bool,
        wire_dtype: str,
    ) -> None:
        self._worker_count, self._join_workers = worker_count, join_workers
        self._receive, self._leave_workers = receive, leave_workers
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        self.timeout_s = timeout_s
        self.tie_word_embeddings, self.wire_dtype = tie_word_embeddings, wire_dtype
        self._group: tuple[str, int] | None = None  # (name, plan fingerprint)

    async def load(self, weights: Mapping[str, Any], version: int) -> None:
        """Send `weights` (Hugging Face names) to the workers and wait until they have loaded them as `version`."""
        plan = SyncPlan.build(
            tensor_specs(weights.items()),
            bucket_bytes=self.bucket_bytes,
            transport="gloo",
            tie_word_embeddings=self.tie_word_embeddings,
            wire_dtype=self.wire_dtype,
        )
        name = await self._group_for(plan)
        backstop = sync_backstop_s(self.timeout_s, plan.total_bytes)
        send = asyncio.to_thread(send_weights, weights.items(), plan, process_groups.get_group(name), version=version)
        await asyncio.gather(send, self._receive(name, backstop))

    async def _group_for(self, plan: SyncPlan) -> str:
        if self._group is not None and self._group[1] == plan.fingerprint:
            return self._group[0]
        if self._group is not None:  # the layout changed: the workers' plan is stale
            await self._leave_workers(self._group[0])
            process_groups.leave(self._group[0])
        name = f"rlmesh-local-{uuid.uuid4().hex[:8]}"
        world = 1 + await self._worker_count()
        addr, port = process_groups.open_store(name, world, self.timeout_s)
        request = join_request(name, "gloo", addr, port, 1, world, self.timeout_s, plan.to_json())
        await asyncio.gather(
            asyncio.to_thread(process_groups.join, name, "gloo", addr, port, 0, world, self.timeout_s),
            self._join_workers(request),
        )
        self._group = (name, plan.fingerprint)
        return name
