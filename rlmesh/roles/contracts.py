"""What each role kind must provide: its endpoints and capabilities (Protocols), checked on the class before any actor.

A class plays a role by providing the role's endpoints, each marked with @endpoint and callable with the arguments
the loop passes; it need not inherit from anything of rlmesh's. Capabilities are class attributes; a class that
declares none gets the defaults of `Capabilities`. The run plan reads them from the class named by `_target_`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

from rlmesh.config import SamplingConfig
from rlmesh.data import Batch
from rlmesh.mesh import ActorMesh, endpoint
from rlmesh.mesh.endpoint import endpoints_of
from rlmesh.roles.rollout.base import Sample
from rlmesh.sync.manifest import SyncPlan

COLLECTIVE_TRANSPORTS = ("gloo", "nccl", "cuda_ipc")


@dataclass(frozen=True)
class Capabilities:
    """What a role class can do, read from its class attributes of the same names."""

    # Rollouts: how weights can reach it; trainers: how it can send them. object_store = a full state dict through
    # Ray's object store (load_weights / export_weights); gloo, nccl and cuda_ipc = bucketed collective syncs.
    weight_transports: tuple[str, ...] = ("object_store",)
    supports_sleep: bool = False  # frees its GPU memory between generations (sleep / wake_up endpoints)
    needs_gpu: bool | None = None  # on a cuda run it must be given a GPU; None: the role's default (scorers: no)
    takes_device: bool | None = None  # gets the run's device as `device=`; None: when __init__ has that parameter


def capabilities_of(cls: type, *, needs_gpu: bool = True) -> Capabilities:
    """The class's declared capabilities, the undeclared ones from their defaults: `needs_gpu` is the role's
    default, `takes_device` whether __init__ has a `device` parameter."""
    declared = {f.name: getattr(cls, f.name) for f in fields(Capabilities) if hasattr(cls, f.name)}
    declared.setdefault("needs_gpu", needs_gpu)
    declared.setdefault("takes_device", "device" in _parameters(cls))
    return Capabilities(**declared)


# ---------------------------------------------------------------- the contracts


class Rollout(Protocol):
    """Generates responses token-in/token-out and takes new weights. Constructed as
    cls(config: RolloutConfig, model: ModelConfig, *, seed: int[, device: str])."""

    weight_transports: ClassVar[tuple[str, ...]]

    @endpoint
    async def generate(
        self, prompt_ids: list[int], n: int, sampling: SamplingConfig | None = None, seed: int | None = None
    ) -> list[Sample]: ...

    @endpoint
    async def load_weights(self, weights: Mapping[str, Any], version: int) -> None: ...


class CollectiveRollout(Rollout, Protocol):
    """A rollout whose engines join a weight-sync group and receive bucketed weights over it (gloo, nccl, cuda_ipc)."""

    @endpoint
    async def engine_info(self) -> dict[str, Any]: ...

    @endpoint
    async def join_weight_group(self, request: str) -> list[int]: ...

    @endpoint
    async def receive_weights(self, name: str, timeout_s: float) -> dict[str, float]: ...

    @endpoint
    async def leave_weight_group(self, name: str) -> None: ...


class SleepingRollout(Rollout, Protocol):
    """A rollout that gives its GPU memory to a colocated trainer between generations."""

    @endpoint
    async def sleep(self, level: int = 1) -> bool: ...

    @endpoint
    async def wake_up(self, tags: list[str] | None = None) -> bool: ...


class BusyTimedRollout(Rollout, Protocol):
    """A rollout that reports its engine's busy time (rlmesh.roles.rollout.base.BusyClock): the loop turns it into
    rollouter/idle_ratio. Optional: without it that metric is left out."""

    @endpoint
    async def busy_time(self) -> dict[str, float]: ...


class PolicyLearner(Protocol):
    """The policy: old log-probs, PPO-style updates, weights out, checkpoints. Constructed as
    cls(config: ActorConfig, *, rollout_n: int, total_training_steps: int, seed: int[, device: str])."""

    @endpoint
    def compute_logprobs(self, batch: Batch) -> Batch: ...

    @endpoint
    def update(self, batch: Batch) -> dict[str, float]: ...

    @endpoint
    def export_weights(self) -> dict[str, Any] | None: ...

    @endpoint
    def save_checkpoint(self, path: str) -> None: ...

    @endpoint
    def load_checkpoint(self, path: str) -> None: ...


class CollectivePolicyLearner(PolicyLearner, Protocol):
    """A policy that sends its weights in buckets over a weight-sync group."""

    @endpoint
    def weight_specs(self) -> list[tuple[str, str, tuple[int, ...]]]: ...

    @endpoint
    def push_weights(self, group_name: str, plan: SyncPlan, version: int) -> dict[str, float]: ...


class ValueLearner(Protocol):
    """The critic: values and value updates, checkpoints. Constructed as
    cls(config: CriticConfig, *, rollout_n: int, total_training_steps: int, seed: int[, device: str])."""

    @endpoint
    def compute_values(self, batch: Batch) -> Batch: ...

    @endpoint
    def update(self, batch: Batch) -> dict[str, float]: ...

    @endpoint
    def save_checkpoint(self, path: str) -> None: ...

    @endpoint
    def load_checkpoint(self, path: str) -> None: ...


class Reference(Protocol):
    """Log-probs under the frozen initial policy. Constructed as cls(config: ReferenceConfig, model: ModelConfig
    [, device: str])."""

    @endpoint
    def compute_ref_logprobs(self, batch: Batch) -> Batch: ...


class Scorer(Protocol):
    """Rewards: `token_level_scores` [B, T] and a per-row `score`. Constructed as cls(config: RewardConfig, *,
    tokenizer_path: str, max_response_length: int[, device: str])."""

    @endpoint
    def score(self, batch: Batch) -> Batch: ...


class AgentLoop(Protocol):
    """Plays multi-turn episodes: n per dataset row, each turn generated by the rollout mesh it was given, and
    returns their samples (Sample.response_mask 0 on environment and tool tokens, env_reward, episode stats).
    Constructed as cls(config: AgentConfig, rollout: <the rollout mesh>, *, tokenizer_path: str)."""

    @endpoint
    async def run_group(
        self, row: Mapping[str, Any], n: int, sampling: SamplingConfig | None = None, seed: int | None = None
    ) -> list[Sample]: ...


# ---------------------------------------------------------------- checking a class against a contract


def contract_problems(cls: type, contract: type, kwargs: Mapping[str, Any]) -> list[str]:
    """Why `cls` cannot play `contract`, one line per problem: a missing or undecorated endpoint, an endpoint that
    cannot take the arguments the loop passes, a constructor that cannot take the role's arguments."""
    problems = []
    offered = endpoints_of(cls)
    for name in endpoints_of(contract):
        wanted = _parameters(getattr(contract, name))
        if name not in offered:
            how = "is not marked @endpoint" if callable(getattr(cls, name, None)) else "is missing"
            problems.append(
                f"{cls.__qualname__} has no endpoint {name}({', '.join(wanted)}) ({how}), which the "
                f"{contract.__name__} contract needs"
            )
            continue
        try:
            inspect.signature(getattr(cls, name)).bind(None, *wanted)
        except TypeError as err:
            problems.append(
                f"{cls.__qualname__}.{name} cannot be called as {name}({', '.join(wanted)}), as the "
                f"{contract.__name__} contract calls it: {err}"
            )
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        problems.append(f"{cls.__qualname__}({', '.join(f'{k}=...' for k in kwargs)}) cannot be constructed: {err}")
    return problems


def _parameters(fn: Any) -> list[str]:
    """The parameter names of a function or a class's constructor, without self."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    return [name for name in params if name != "self"]


# ---------------------------------------------------------------- meshes typed by their contract

# Meshes whose endpoints are the contract's: the mesh's mypy plugin checks every all / choose / shard call against
# the contract's signatures, and an endpoint the contract lacks. The plan checked the classes against the contracts.
RolloutMesh = ActorMesh[Rollout]
SleepingRolloutMesh = ActorMesh[SleepingRollout]
BusyTimedRolloutMesh = ActorMesh[BusyTimedRollout]
PolicyMesh = ActorMesh[PolicyLearner]
ValueMesh = ActorMesh[ValueLearner]
ReferenceMesh = ActorMesh[Reference]
ScorerMesh = ActorMesh[Scorer]
AgentLoopMesh = ActorMesh[AgentLoop]
