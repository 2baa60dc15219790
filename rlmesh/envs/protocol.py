"""The environment contract: reset(row) and step(action), sync or async; its other public methods are its tools."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# An observation is a user message's text, or chat messages ({"role", "content"}) to append to the conversation.
Observation = str | list[dict[str, Any]]

# The contract's own methods; every other public method of an environment's class is a tool.
PROTOCOL_METHODS = frozenset({"reset", "step", "close"})


class Environment(Protocol):
    """What a multi-turn rollout drives. Plain classes play it (no base class), constructed with no arguments or
    with the environment config's kwargs, one instance per trajectory. Either method may be `async def`.

    - reset(row): the task's first observation, from the dataset row (prompt, ground_truth, extra_info, ...).
    - step(action): the model's turn as text, when it called no tool; returns (observation, reward, done, info)
      as a StepResult or a 4-tuple. A turn that calls tools gets their results instead, and no step.

    Tools are the class's other public methods, with type hints and a Google-style docstring (Args:), from which
    their JSON schemas are rendered for the chat template's `tools=` argument."""

    def reset(self, row: Mapping[str, Any]) -> Any: ...

    def step(self, action: str) -> Any: ...


@dataclass
class StepResult:
    observation: Observation | None  # None: nothing to append (the episode is over)
    reward: float | None = None  # None: the run's reward function scores the trajectory
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def as_step_result(value: Any) -> StepResult:
    """A StepResult from what step returned: a StepResult, or gym's (observation, reward, done, info)."""
    if isinstance(value, StepResult):
        return value
    if isinstance(value, tuple) and len(value) == 4:
        observation, reward, done, info = value
        return StepResult(observation, None if reward is None else float(reward), bool(done), dict(info or {}))
    raise TypeError(
        f"an environment's step must return a StepResult or (observation, reward, done, info), got {value!r}"
    )


def tool_methods(env: Any) -> dict[str, Callable[..., Any]]:
    """The environment's tools, by name: its class's public methods that are not the contract's own (an adapter
    names another object's instead, with __rlmesh_tools__)."""
    adapted = getattr(env, "__rlmesh_tools__", None)
    if adapted is not None:
        return dict(adapted())
    tools = {}
    for name, _function in inspect.getmembers(type(env), predicate=inspect.isfunction):
        if not name.startswith("_") and name not in PROTOCOL_METHODS:
            tools[name] = getattr(env, name)
    return tools


class TRLEnvironment:
    """Runs a TRL environment_factory-style class: reset(**row fields) returns text for the prompt (or None), and
    every public method but reset is a tool. The model's turn without a tool call ends the episode, which the run's
    reward function scores. Construct as TRLEnvironment(cls) or TRLEnvironment(instance)."""

    def __init__(self, target: Any) -> None:
        self.inner = target() if isinstance(target, type) else target

    def __rlmesh_tools__(self) -> dict[str, Callable[..., Any]]:
        return {
            name: getattr(self.inner, name)
            for name, _function in inspect.getmembers(type(self.inner), predicate=inspect.isfunction)
            if not name.startswith("_") and name != "reset"
        }

    def reset(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        fields = {key: value for key, value in row.items() if key != "prompt"}
        extra = self.inner.reset(**fields)
        messages = [dict(message) for message in row["prompt"]]
        if extra:  # TRL appends reset's text to the last user message
            users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
            if users:
                messages[users[-1]]["content"] = f"{messages[users[-1]]['content']}{extra}"
            else:
                messages.append({"role": "user", "content": str(extra)})
        return messages

    def step(self, action: str) -> StepResult:
        return StepResult(None, None, True)


def tool_schemas(env: Any) -> list[dict[str, Any]]:
    """The tools' JSON schemas (transformers' get_json_schema: from type hints and the docstring's Args section),
    as the chat template's `tools=` argument takes them. A tool without hints or docstring is named in the error."""
    from transformers.utils import get_json_schema

    schemas = []
    for name, method in tool_methods(env).items():
        try:
            schemas.append(get_json_schema(method))
        except Exception as err:  # transformers' DocstringParsingException / TypeHintParsingException
            raise ValueError(
                f"tool {type(env).__name__}.{name} has no schema ({err}); give every argument a type hint and "
                "describe it under Args: in the docstring, or make the method private (_name)"
            ) from err
    return schemas
