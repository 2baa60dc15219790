"""The run plan: which class plays each role, its mesh shape, resources, constructor arguments and start order.

One table, read by the resource checks, the placement and build_roles alike. Classes come from `_target_` and are
checked against their role's contract (rlmesh.roles.contracts) here, before any actor starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from hydra.utils import get_class

from rlmesh.config import ActorConfig, CriticConfig, Report, RlmeshConfig
from rlmesh.roles.contracts import (
    COLLECTIVE_TRANSPORTS,
    AgentLoop,
    Capabilities,
    CollectivePolicyLearner,
    CollectiveRollout,
    PolicyLearner,
    Reference,
    Rollout,
    Scorer,
    SleepingRollout,
    ValueLearner,
    capabilities_of,
    contract_problems,
)

TRANSPORTS = ("auto", "object_store", *COLLECTIVE_TRANSPORTS)
NO_WEIGHTS = "none"  # the weight transport of a rollout class that takes no weights (it declares only this one)
REPLAY_ROLLOUT = "rlmesh.roles.rollout.replay.ReplayRollout"  # the rollout of trainer.replay_rollouts
LEARNERS = ("trainer", "critic")  # roles that train, with a learning-rate schedule over the run
# Roles whose class needs no GPU unless it says so (needs_gpu = True): rule scorers run on CPU.
CPU_BY_DEFAULT = ("reward", "agent")


class _Row(NamedTuple):
    """What the config says about one role, before its class is read."""

    name: str
    target: str
    size: int  # actors, along the mesh's one dimension dp
    resources_field: str  # the role config's field with what each actor asks Ray for
    kwargs: dict[str, Any]
    mesh_options: dict[str, Any]
    optimizer_steps: int = 0


@dataclass(frozen=True)
class RoleSpec:
    """One row of the role table."""

    name: str  # trainer | rollout | reward | reference | critic
    cls: type
    contracts: tuple[type, ...]  # the Protocols the class was checked against
    capabilities: Capabilities
    shape: dict[str, int]
    resources: dict[str, float]  # what each actor asks Ray for
    resources_key: str  # the config key those come from, for messages
    kwargs: dict[str, Any]  # constructor arguments (a learner's total_training_steps joins them when it is known)
    mesh_options: dict[str, Any] = field(default_factory=dict)  # ActorMesh options: distributed_env, auto_restart...
    wave: int = 0  # start order: wave 1 starts once every wave-0 mesh is up
    colocate_with: str | None = None  # shares that role's placement, bundle i holding both roles' rank i
    bundle: dict[str, float] | None = None  # what one placement bundle holds, when it is more than `resources`
    outside_actors: dict[str, float] = field(default_factory=dict)  # taken by its own processes (vLLM's tp workers)
    optimizer_steps_per_step: int = 0  # a learner's: it gets total_training_steps = total steps × this

    @property
    def size(self) -> int:
        return math.prod(self.shape.values())

    @property
    def learner(self) -> bool:
        return self.name in LEARNERS

    def reserved(self) -> dict[str, float]:
        """What this role takes from the cluster: its placement bundles (none when it lives in another role's) plus
        what its processes take outside them."""
        bundle = {} if self.colocate_with else (self.bundle or self.resources)
        total = {k: float(v) * self.size for k, v in bundle.items()}
        for k, v in self.outside_actors.items():
            total[k] = total.get(k, 0.0) + v
        return total


@dataclass(frozen=True)
class RunPlan:
    """What the checks derived from the config (the config itself is never changed)."""

    device: str
    use_critic: bool
    use_reference: bool
    roles: tuple[RoleSpec, ...]
    samples_per_step: int
    weight_sync: str = "object_store"  # the transport `auto` resolved to: object_store | gloo | nccl | cuda_ipc

    @property
    def resources(self) -> dict[str, dict[str, float]]:
        """role -> what its mesh takes from the cluster."""
        return {spec.name: spec.reserved() for spec in self.roles}

    def role(self, name: str) -> RoleSpec:
        return next(spec for spec in self.roles if spec.name == name)


def resolve_role_class(bad: Report, key: str, target: str) -> type | None:
    try:
        cls = get_class(target)
    except Exception as err:  # Hydra wraps the ImportError or AttributeError
        cause = err.__cause__ or err
        bad(
            f"{key}._target_",
            target,
            f"cannot be imported ({type(cause).__name__}: {cause})",
            "give the dotted path of a class (package.module.Class) importable from the directory you run in",
        )
        return None
    return cls


def plan_roles(
    bad: Report, cfg: RlmeshConfig, device: str, use_critic: bool, use_reference: bool
) -> tuple[tuple[RoleSpec, ...], str]:
    """The role table and the weight transport, or problems reported through `bad` (then the table may be short)."""
    roles, seed = cfg.roles, cfg.trainer.seed
    actor, rollout, reward, critic, ref = roles.trainer, roles.rollout, roles.reward, roles.critic, roles.reference
    prompts = cfg.data.train_batch_size
    service = {"distributed_env": False}  # roles whose actors compute alone, with no process group

    def learner(name: str, config: ActorConfig | CriticConfig) -> _Row:
        steps = config.ppo_epochs * (prompts // max(config.ppo_mini_batch_size, 1))
        kwargs = dict(config=config, rollout_n=rollout.n, seed=seed)
        return _Row(name, config._target_, config.dp_size, "resources_per_device", kwargs, {}, steps)

    replay = cfg.trainer.replay_rollouts
    rows = [
        learner("trainer", actor),
        _Row(
            "rollout",
            REPLAY_ROLLOUT if replay else rollout._target_,  # a replayed run's samples come from the dump
            rollout.num_engines,
            "resources_per_engine",
            dict(config=rollout, model=actor.model, seed=seed) | ({"dump_dir": replay} if replay else {}),
            {
                **service,
                "max_in_flight_per_actor": rollout.max_concurrent_requests_per_engine,
                "auto_restart": True,
                # every turn of an episode to the engine with its prefix cache (calls without a key: power of two)
                "router": "sticky" if roles.agent.environment else "power_of_two",
            },
        ),
        _Row(
            "reward",
            reward._target_,
            reward.num_actors,
            "resources_per_actor",
            dict(config=reward, tokenizer_path=actor.model.path, max_response_length=rollout.sampling.max_tokens),
            service,
        ),
    ]
    if use_reference:
        rows.append(
            _Row(
                "reference",
                ref._target_,
                ref.dp_size,
                "resources_per_device",
                dict(config=ref, model=actor.model),
                service,
            )
        )
    if use_critic:
        rows.append(learner("critic", critic))
    agent = roles.agent
    if agent.environment:  # multi-turn: episodes played by agent-loop actors (given the rollout mesh at start)
        kwargs = dict(config=agent, rollout=None, tokenizer_path=actor.model.path)
        rows.append(_Row("agent", agent._target_, agent.num_actors, "resources_per_actor", kwargs, service))
    classes = {row.name: resolve_role_class(bad, f"roles.{row.name}", row.target) for row in rows}
    caps = {
        name: capabilities_of(cls, needs_gpu=name not in CPU_BY_DEFAULT)
        for name, cls in classes.items()
        if cls is not None
    }
    transport = resolve_weight_transport(bad, cfg, device, caps.get("trainer"), caps.get("rollout"))
    contracts = role_contracts(transport, rollout.enable_sleep_mode)
    if rollout.enable_sleep_mode and "rollout" in caps and not caps["rollout"].supports_sleep:
        bad(
            "roles.rollout.enable_sleep_mode",
            True,
            f"the rollout class {rollout._target_} does not declare supports_sleep",
            "set it to false, or use a rollout that can sleep (rlmesh.roles.rollout.vllm.VLLMRollout)",
        )
    colocated = rollout.colocate_with_trainer
    specs = []
    for row in rows:
        name, cls = row.name, classes[row.name]
        if cls is None:
            continue
        kwargs = {**row.kwargs, "device": device} if caps[name].takes_device else row.kwargs
        constructed = {**kwargs, "total_training_steps": 0} if name in LEARNERS else kwargs
        problems: dict[str, type] = {}  # a narrower contract repeats its base's problems: each is reported once
        for contract in contracts[name]:
            problems |= {p: contract for p in contract_problems(cls, contract, constructed) if p not in problems}
        key = f"roles.{name}._target_"
        for problem, contract in problems.items():
            fix = _constructor_fix(name, kwargs) if "cannot be constructed" in problem else _contract_fix(contract)
            bad(key, f"{cls.__module__}.{cls.__qualname__}", problem, fix)
        is_rollout = name == "rollout"
        tensor_parallel = rollout.tensor_parallel_size
        specs.append(
            RoleSpec(
                name,
                cls,
                contracts[name],
                caps[name],
                {"dp": row.size},
                dict(getattr(getattr(roles, name), row.resources_field)),
                f"roles.{name}.{row.resources_field}",
                kwargs,
                row.mesh_options,
                # vLLM sizes its cache from the GPU memory it finds free, so colocated engines start after the trainer;
                # agent loops get the rollout mesh, so they start after it
                wave=(1 if colocated and is_rollout else 0) + (2 if name == "agent" else 0),
                # vLLM's ray executor reserves the tensor-parallel workers' GPUs itself, outside the engine actor
                outside_actors={"GPU": float(tensor_parallel * row.size)} if is_rollout and tensor_parallel > 1 else {},
                optimizer_steps_per_step=row.optimizer_steps,
            )
        )
    if colocated and {"trainer", "rollout"} <= {s.name for s in specs}:
        specs = _colocate(specs)
    return tuple(specs), transport


def role_contracts(transport: str, sleeps: bool) -> dict[str, tuple[type, ...]]:
    """The Protocols each role's class must satisfy, given the resolved transport and sleep mode."""
    collective = transport in COLLECTIVE_TRANSPORTS
    rollout: tuple[type, ...] = (Rollout,) + ((CollectiveRollout,) if collective else ())
    return {
        "trainer": (PolicyLearner,) + ((CollectivePolicyLearner,) if collective else ()),
        "rollout": rollout + ((SleepingRollout,) if sleeps else ()),
        "reward": (Scorer,),
        "reference": (Reference,),
        "critic": (ValueLearner,),
        "agent": (AgentLoop,),
    }


def resolve_weight_transport(
    bad: Report, cfg: RlmeshConfig, device: str, trainer: Capabilities | None, rollout: Capabilities | None
) -> str:
    """roles.rollout.weight_sync, with `auto` resolved from what both classes can do: a collective transport when
    both can (cuda_ipc colocated on GPU, nccl across GPUs, gloo on CPU), else the object store."""
    asked = cfg.roles.rollout.weight_sync
    if rollout is not None and rollout.weight_transports == (NO_WEIGHTS,):
        return NO_WEIGHTS  # the rollout takes no weights (a replay of dumped samples)
    if asked not in TRANSPORTS:
        bad("roles.rollout.weight_sync", asked, "unknown transport", f"use one of {TRANSPORTS}")
        return asked
    if trainer is None or rollout is None:
        return asked
    both = [t for t in rollout.weight_transports if t in trainer.weight_transports]
    transport = asked
    if asked == "auto":  # the first of the device's preferences that both classes can do
        if device == "cuda":
            preferred = ["cuda_ipc"] if cfg.roles.rollout.colocate_with_trainer else ["nccl"]
        else:
            preferred = ["gloo"]
        transport = next((t for t in preferred if t in both), "object_store")
    for role, caps in (("rollout", rollout), ("trainer", trainer)):
        if transport not in caps.weight_transports:
            target = cfg.roles.rollout._target_ if role == "rollout" else cfg.roles.trainer._target_
            bad(
                "roles.rollout.weight_sync",
                asked,
                f"the {role} class {target} moves weights over {list(caps.weight_transports)} only, not {transport}",
                f"use auto or one of {both}" if both else "pick trainer and rollout classes that share a transport",
            )
    return transport


def _colocate(specs: list[RoleSpec]) -> list[RoleSpec]:
    """Engine i joins trainer rank i's bundle: resources add up, except that the bundle holds at most one GPU,
    which both share, so fractions that sum past 1 are scaled down in proportion."""
    trainer = next(s for s in specs if s.name == "trainer")
    rollout = next(s for s in specs if s.name == "rollout")
    bundle, trainer_request, engine_request = colocated_resources(trainer.resources, rollout.resources)
    out = []
    for spec in specs:
        if spec is trainer:
            spec = replace(spec, resources=trainer_request, bundle=bundle)
        elif spec is rollout:
            spec = replace(spec, resources=engine_request, colocate_with="trainer")
        out.append(spec)
    return out


def colocated_resources(
    trainer: dict[str, float], engine: dict[str, float]
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(bundle, trainer request, engine request) when a trainer rank and an engine share one bundle: resources add
    up, except that the bundle holds at most one GPU, which both actors share (so Ray gives them the same
    CUDA_VISIBLE_DEVICES): GPU fractions that sum past 1 are scaled down in proportion, {GPU: 1} each to halves."""
    bundle = {k: float(trainer.get(k, 0.0)) + float(engine.get(k, 0.0)) for k in {*trainer, *engine}}
    trainer_request = {k: float(v) for k, v in trainer.items()}
    engine_request = {k: float(v) for k, v in engine.items()}
    gpus = bundle.get("GPU", 0.0)
    if gpus > 1:
        bundle["GPU"] = 1.0
        for request in (trainer_request, engine_request):
            if "GPU" in request:
                request["GPU"] /= gpus
    return bundle, trainer_request, engine_request


def _constructor_fix(role: str, kwargs: dict[str, Any]) -> str:
    names = ", ".join([*kwargs, *(["total_training_steps"] if role in LEARNERS else [])])
    return f"give the class an __init__ that takes the {role}'s arguments ({names}), or point _target_ at one that does"


def _contract_fix(contract: type) -> str:
    return (
        f"give the class the endpoints of rlmesh.roles.contracts.{contract.__name__} (marked @endpoint), or "
        "point _target_ at a class that has them"
    )
