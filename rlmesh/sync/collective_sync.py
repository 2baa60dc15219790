"""The controller's weight sync: trainer rank 0 to every vLLM worker over one collective group, with deadlines."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from rlmesh.mesh import ActorMesh
from rlmesh.mesh.collective import join_on, leave_on, open_store_on
from rlmesh.mesh.futures import settle
from rlmesh.sync.manifest import TRANSPORTS, SyncPlan
from rlmesh.sync.transports import WeightSyncError, process_group_backend
from rlmesh.sync.vllm_worker import join_request

log = logging.getLogger(__name__)

# Members reach the store and then wait for the rest up to the timeout; allow this much past it for the replies.
_REPLY_MARGIN_S = 10.0
# Every wait inside a sync has the group's timeout, so a failure surfaces within it; the controller's backstop for a
# whole sync (a member that never answers at all) also allows the bytes time to move at this floor, far below any
# link measured (gloo on loopback moved 2.8-5.6 GB/s here), so a large model's sync is never cut short.
_SLOWEST_BYTES_PER_S = 50e6


def sync_backstop_s(timeout_s: float, total_bytes: int) -> float:
    """How long to wait for a whole sync of `total_bytes` before giving up on a member that never answers."""
    return timeout_s + total_bytes / _SLOWEST_BYTES_PER_S


@dataclass
class _Link:
    """One process group of a sync: a trainer rank that sends, and the engines (rollout positions) it sends to."""

    sender: int
    positions: list[int]


@dataclass
class _Group:
    """Every link of one sync. All links share the name: each member process holds only its own link's group."""

    name: str
    links: list[_Link]

    @property
    def positions(self) -> list[int]:
        return [pos for link in self.links for pos in link.positions]


class CollectiveWeightSync:
    """Pushes the trainer's weights to every rollout engine: trainer rank 0 sends, every engine worker receives.
    With `colocated`, engine i shares trainer rank i's GPU and receives from that rank instead (cuda_ipc), over a
    group of its own; every rank holds the full tensors during a sync anyway, since FSDP2 gathers them on all.

    The trainer mesh plays rlmesh.roles.contracts.CollectivePolicyLearner (rank 0 answers weight_specs; all ranks
    run push_weights in lockstep, = send_weights(self.iter_full_weights(), plan, member_group(group_name), ...)),
    the rollout mesh CollectiveRollout (engine_info, join_weight_group, receive_weights, leave_weight_group).

    Every wait has a deadline. A failed sync raises WeightSyncError naming the members that failed or did not
    finish, tears the group down, and the next push forms a new one.
    """

    def __init__(
        self,
        trainer: ActorMesh[Any],
        rollout: ActorMesh[Any],
        *,
        transport: str = "gloo",
        bucket_mb: float = 256,
        timeout_s: float = 120.0,
        name: str = "weights",
        colocated: bool = False,
        wire_dtype: str | None = "engine",
    ) -> None:
        """wire_dtype: 'engine' casts floating tensors to the engine's dtype on the sender (fewer bytes when the
        trainer keeps float32 and the engine serves bfloat16); None sends each tensor in its own dtype."""
        if transport not in TRANSPORTS:
            raise ValueError(f"weight-sync transport {transport!r} is unknown; use gloo, nccl or cuda_ipc")
        for endpoint_name in ("weight_specs", "push_weights"):
            if not hasattr(trainer, endpoint_name):
                raise WeightSyncError(
                    f"trainer mesh '{trainer.name}' has no endpoint {endpoint_name!r}, which the {transport} weight "
                    "sync calls (see CollectiveWeightSync); add it, or set roles.rollout.weight_sync=object_store"
                )
        if colocated and trainer.size != rollout.size:
            raise WeightSyncError(
                f"a colocated sync pairs trainer rank i with engine i, but '{trainer.name}' has {trainer.size} ranks "
                f"and '{rollout.name}' {rollout.size} engines"
            )
        self.trainer, self.rollout = trainer, rollout
        self.colocated = colocated
        self.transport = transport
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        self.timeout_s = float(timeout_s)
        # Engines keep a group per name, and several syncs may reach the same engines: names must never collide.
        self.name = f"{name}-{uuid.uuid4().hex[:6]}"
        self.wire_dtype = wire_dtype
        self.plan: SyncPlan | None = None
        self.version: int | None = None  # the version every live engine serves, after the last successful push
        self._held: int | None = None  # the version of the last push attempted: what the trainer holds now
        self._dirty = False  # a push failed: engines may hold a mix, so the next push must reach all of them
        self._workers: dict[int, int] = {}  # rollout position -> workers in its engine
        self._group: _Group | None = None
        self._counter = itertools.count()
        self._lock = threading.RLock()

    # ------------------------------------------------------------ lifecycle

    def setup(self) -> None:
        """Plan the sync from the trainer's tensor specs and the engines' settings, and form the group (which
        hands every engine worker the plan)."""
        with self._lock:
            deadline = self.timeout_s + _REPLY_MARGIN_S
            rank0 = self.trainer.actors[0]
            specs = ray.get(rank0.weight_specs.remote(), timeout=deadline)
            infos = self.rollout.engine_info.all().result(timeout=deadline)
            dtypes = {info["dtype"] for info in infos}
            ties = {info["tie_word_embeddings"] for info in infos}
            if len(dtypes) > 1 or len(ties) > 1:
                raise WeightSyncError(f"the rollout engines disagree on dtype {dtypes} or tied embeddings {ties}")
            wire = dtypes.pop() if self.wire_dtype == "engine" else self.wire_dtype
            self.plan = SyncPlan.build(
                specs,
                bucket_bytes=self.bucket_bytes,
                transport=self.transport,
                tie_word_embeddings=ties.pop(),
                wire_dtype=wire,
            )
            self._workers = {pos: len(info["workers"]) for pos, info in enumerate(infos)}
            log.info(
                "weight sync planned: %d tensors, %.1f MB in %d buckets over %s",
                len(self.plan.slots),
                self.plan.total_bytes / 1e6,
                self.plan.num_buckets,
                self.transport,
            )
            self._group = self._form(list(range(self.rollout.size)))

    def push(self, version: int) -> dict[str, float]:
        """Send the trainer's current weights to every engine as `version`; returns timing and size metrics."""
        with self._lock:
            if self.plan is None:
                self.setup()
            if self._group is None:
                self._group = self._form(list(range(self.rollout.size)))
            self._held = version
            self._dirty = True
            metrics = self._push(self._group, version)
            self.version, self._dirty = version, False
            return metrics

    def on_rollout_restart(self, rollout: ActorMesh[Any], positions: Sequence[int]) -> None:
        """Give replaced engines the trainer's weights before they take requests, and form the group again over
        all engines (the old one lost a member).

        Has the rollout mesh's on_restart hook signature (`rollout` is the mesh this sync was built with). Call it
        from that hook, which runs before restarted actors are marked alive, and
        only while the trainer holds the weights of the last push attempted (during generation, where engines die):
        those weights are what gets sent. If the last push failed, every engine may hold a mix, so all get them.
        """
        with self._lock:
            if self._group is not None:
                self._teardown(self._group)
                self._group = None
            if self.plan is None:
                return  # not set up yet: the first push forms the group
            everyone = list(range(self.rollout.size))
            if self._held is None:
                self._group = self._form(everyone)  # nothing pushed yet: engines serve the checkpoint they loaded
                return
            if self._dirty:
                self._group = self._form(everyone)
                self._push(self._group, self._held)
                self.version, self._dirty = self._held, False
                log.info("pushed weight version %d to every engine after a failed sync and a restart", self._held)
                return
            replaced = sorted(positions)
            fresh = self._form(replaced)
            try:
                self._push(fresh, self._held)
            finally:
                self._teardown(fresh)
            log.info("pushed weight version %d to restarted engines %s", self._held, replaced)
            self._group = self._form(everyone)

    def close(self) -> None:
        with self._lock:
            if self._group is not None:
                self._teardown(self._group)
                self._group = None

    # ------------------------------------------------------------ internals

    def _form(self, positions: list[int]) -> _Group:
        """The group reaching the engines at `positions`: one link from rank 0, or one per colocated pair."""
        assert self.plan is not None
        name = f"{self.name}-{next(self._counter)}"
        links = [_Link(pos, [pos]) for pos in positions] if self.colocated else [_Link(0, positions)]
        group = _Group(name, links)
        worlds = [1 + sum(self._workers[pos] for pos in link.positions) for link in links]
        stores = [
            open_store_on(self.trainer, link.sender, name, world, self.timeout_s)
            for link, world in zip(links, worlds, strict=True)
        ]
        try:
            addresses = ray.get(stores, timeout=self.timeout_s)
        except Exception as err:
            self._leave_senders(group)  # drops the stores that did open
            raise WeightSyncError(f"weight-sync group '{name}': a sender could not host its store: {err}") from err
        backend = process_group_backend(self.transport)
        plan_json = self.plan.to_json()
        refs: list[Any] = []
        who: list[str] = []
        for link, world, (addr, port) in zip(links, worlds, addresses, strict=True):
            refs.append(join_on(self.trainer, link.sender, name, backend, addr, port, 0, world, self.timeout_s))
            who.append(f"{self.trainer.name} rank {link.sender} (sender)")
            first_rank = 1
            for pos in link.positions:
                request = join_request(name, self.transport, addr, port, first_rank, world, self.timeout_s, plan_json)
                refs.append(self.rollout[pos].join_weight_group.call_one(request).refs[0])
                last_rank = first_rank + self._workers[pos] - 1
                who.append(f"{self.rollout.name} engine {pos} (ranks {first_rank}..{last_rank})")
                first_rank = last_rank + 1
        problems = settle(refs, self.timeout_s + _REPLY_MARGIN_S).problems(who)
        if problems:
            self._teardown(group)
            raise WeightSyncError(
                f"weight-sync group '{name}' ({self.transport}, {len(links)} link(s), world size {max(worlds)}) could "
                f"not form within {self.timeout_s:.0f}s: " + "; ".join(problems)
            )
        return group

    def _push(self, group: _Group, version: int) -> dict[str, float]:
        assert self.plan is not None
        started = time.perf_counter()
        backstop = sync_backstop_s(self.timeout_s + _REPLY_MARGIN_S, self.plan.total_bytes)
        sender = self.trainer.push_weights.all(group.name, self.plan, version)
        receivers = [self.rollout[pos].receive_weights.call_one(group.name, backstop) for pos in group.positions]
        refs = [*sender.refs, *(r.refs[0] for r in receivers)]
        who = [f"{self.trainer.name} rank {i}" for i in range(len(sender.refs))]
        who += [f"{self.rollout.name} engine {pos}" for pos in group.positions]
        # On the first failure the senders leave at once: closing their connections wakes receivers still waiting
        # for buckets that will never come, instead of leaving them to their timeout.
        settled = settle(
            refs,
            backstop,
            on_first_failure=lambda: self._leave_senders(group),
            after_failure_s=self.timeout_s + _REPLY_MARGIN_S,
        )
        problems = settled.problems(who)
        values = [settled.values[i] for i in range(len(refs))] if settled.ok else []
        seconds = time.perf_counter() - started
        if problems:
            self._teardown(group)
            if group is self._group:
                self._group = None
            raise WeightSyncError(
                f"weight sync of version {version} over '{group.name}' ({self.transport}, "
                f"{self.plan.total_bytes / 1e6:.1f} MB) failed after {seconds:.1f}s (timeout {self.timeout_s:.0f}s): "
                + "; ".join(problems)
            )
        sent = max(
            values[: len(sender.refs)], key=lambda stats: stats["bytes"]
        )  # a rank that sent, not one that only iterated
        loads = values[len(sender.refs) :]
        return {
            "timing_s/sync_transfer": seconds,
            "weight_sync/bytes": float(self.plan.total_bytes),
            "weight_sync/gb_per_s": self.plan.total_bytes / max(seconds, 1e-9) / 1e9,
            "weight_sync/buckets": float(self.plan.num_buckets),
            "weight_sync/send_s": float(sent["seconds"]),
            "weight_sync/load_s_max": max(float(r["seconds"]) for r in loads),
            "weight_sync/version": float(version),
        }

    def _leave_senders(self, group: _Group) -> list[Any]:
        return [leave_on(self.trainer, link.sender, group.name) for link in group.links]

    def _teardown(self, group: _Group) -> None:
        """Every live member leaves the group; a member stuck in a collective leaves when its wait times out."""
        refs = self._leave_senders(group)
        for pos in group.positions:
            with contextlib.suppress(Exception):  # a dead engine has nothing to leave
                refs.append(self.rollout[pos].leave_weight_group.call_one(group.name).refs[0])
        ray.wait(refs, num_returns=len(refs), timeout=2.0)
