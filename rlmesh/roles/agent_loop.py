"""The agent-loop role: plays multi-turn episodes with the run's environment, one routed generate call per turn."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from rlmesh.config import AgentConfig, SamplingConfig
from rlmesh.envs import ChatTurns, Episode, EpisodeLimits, run_episode, tool_schemas
from rlmesh.mesh import ActorMesh, endpoint
from rlmesh.roles.rollout.base import Sample, sampling_seed


def environment_factory(environment: Mapping[str, Any]) -> Any:
    """A function making one environment per call, from the config's {_target_: class path, **kwargs}."""
    from hydra.utils import instantiate

    spec = dict(environment)
    return lambda: instantiate(spec, _convert_="all")


def episode_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """What an environment's reset sees: the dataset row in verl's layout (prompt messages, ground_truth, ...)."""
    return {
        "prompt": [dict(message) for message in row["raw_prompt"]],
        "data_source": row["data_source"],
        "ground_truth": row["ground_truth"],
        "extra_info": dict(row.get("extra_info") or {}),
        "index": row["index"],
    }


class ToolAgentLoop:
    """Runs each group's n episodes as coroutines in this actor, the environments and their tools here too (out of
    the engines' and the controller's processes). Every model turn is one rollout.generate.choose keyed by the
    episode's id, so the sticky router keeps an episode on the engine that holds its prefix cache. Each episode
    becomes one sample (more where the chat template rewrote history), with the environment's reward; an episode
    whose environment failed at reset becomes an empty sample (no token trained) scored 0, so it costs itself only.

    Constructed as cls(config: AgentConfig, rollout: <the rollout mesh>, *, tokenizer_path: str)."""

    needs_gpu = False
    environment_methods = ("reset", "step")  # what roles.agent.environment's class must have (the config check)

    def __init__(self, config: AgentConfig, rollout: ActorMesh[Any], *, tokenizer_path: str) -> None:
        from transformers import AutoTokenizer

        self.rollout = rollout  # attached: routes from this process (ActorMesh.__reduce__)
        self.make_environment = environment_factory(config.environment)
        probe = self.make_environment()
        self.turns = ChatTurns(AutoTokenizer.from_pretrained(tokenizer_path), tool_schemas(probe))
        self.limits = EpisodeLimits(
            max_turns=config.max_turns, max_total_tokens=config.max_total_tokens, tool_timeout_s=config.tool_timeout_s
        )

    @endpoint
    async def run_group(
        self, row: Mapping[str, Any], n: int, sampling: SamplingConfig | None = None, seed: int | None = None
    ) -> list[Sample]:
        """n episodes on dataset row `row` (a PromptRow), their samples in episode order."""
        sampling = sampling or SamplingConfig()
        environment_row = episode_row(row)
        episodes = await asyncio.gather(*(self.play(environment_row, sampling, seed, j) for j in range(n)))
        return group_samples(episodes, self.turns.prompt_ids(environment_row["prompt"]))

    async def play(self, row: dict[str, Any], sampling: SamplingConfig, seed: int | None, j: int) -> Episode:
        try:
            environment = self.make_environment()
        except Exception as err:  # costs this episode only: an empty sample
            error = f"the environment could not be made: {type(err).__name__}: {err}"
            return Episode(pieces=[], messages=[], ended_by="env_error", error=error)
        route_key = uuid.uuid4().hex
        turn_numbers = itertools.count()
        generate = self.rollout.generate.options(route_key=route_key)

        async def sample_turn(context: list[int], max_tokens: int) -> Sample:
            turn_seed = None if seed is None else sampling_seed(seed, j, next(turn_numbers))
            (sample,) = await generate.choose(context, 1, replace(sampling, max_tokens=max_tokens), turn_seed)
            return sample

        limits = replace(self.limits, max_tokens_per_turn=sampling.max_tokens)
        try:
            return await run_episode(environment, row, sample_turn, self.turns, limits)
        finally:
            self.rollout.release_route_key(route_key)
            close = getattr(environment, "close", None)
            if callable(close):
                result = close()
                if inspect.isawaitable(result):
                    await result


def group_samples(episodes: list[Episode], prompt_ids: list[int]) -> list[Sample]:
    """A group's samples, episode by episode (episode_samples); an empty one takes the group's newest version."""
    versions = [p.first_version for e in episodes for p in e.pieces if p.first_version is not None]
    fallback_version = max(versions, default=0)
    return [sample for episode in episodes for sample in episode_samples(episode, prompt_ids, fallback_version)]


def episode_samples(episode: Episode, prompt_ids: list[int], fallback_version: int) -> list[Sample]:
    """One sample per piece of `episode`, with its reward, and its stats on the first; an episode with no piece
    (its environment or agent failed before any turn) becomes one empty sample on `prompt_ids`, scored 0, so that
    its group stays whole and no token of it is trained."""
    stats = episode.stats()
    if not episode.pieces:
        return [Sample(prompt_ids, [], [], fallback_version, "stop", response_mask=[], env_reward=0.0, episode=stats)]
    samples = []
    for k, piece in enumerate(episode.pieces):
        samples.append(
            Sample(
                prompt_ids=piece.prompt_ids,
                response_ids=piece.response_ids,
                logprobs=piece.logprobs,
                weight_version=piece.first_version if piece.first_version is not None else fallback_version,
                finish_reason="length" if episode.ended_by == "length" else "stop",
                last_weight_version=piece.last_version,
                response_mask=piece.response_mask,
                env_reward=episode.reward,
                episode=stats if k == 0 else None,
            )
        )
    return samples
