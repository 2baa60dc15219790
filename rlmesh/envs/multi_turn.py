"""One multi-turn episode: the model's turns, tool calls and environment steps, into append-only token buffers."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlmesh.envs.protocol import Observation, as_step_result, tool_methods
from rlmesh.envs.tool_calls import parse_tool_calls, run_tool
from rlmesh.envs.trajectory import ChatTurns, HistoryRewritten, TokenTrajectory


class SampledTurn(Protocol):
    """What one generation call returns (a rollout Sample has these fields)."""

    response_ids: list[int]
    logprobs: list[float]
    weight_version: int
    last_weight_version: int | None
    finish_reason: str


# generate(context token ids, max new tokens) -> the sampled turn; the caller routes it (one engine per episode).
Generate = Callable[[list[int], int], Awaitable[SampledTurn]]


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 4  # model turns
    max_total_tokens: int = 1024  # prompt and response of one training sample
    max_tokens_per_turn: int = 256
    tool_timeout_s: float = 10.0  # each tool call, and each environment reset or step


@dataclass(frozen=True)
class EpisodeStats:
    """What the metrics need of one episode: small, so it travels with the episode's first sample."""

    num_turns: int
    tool_calls: int
    tool_errors: int
    tool_timeouts: int
    ended_by: str
    pieces: int
    env_error: bool


@dataclass
class Episode:
    pieces: list[TokenTrajectory]  # one training sample each; more than one where the template rewrote history
    messages: list[dict[str, Any]]  # the conversation as text
    reward: float | None = None  # the environment's, summed over its steps; None: the reward function scores it
    num_turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_timeouts: int = 0
    ended_by: str = "done"  # done | no_observation | max_turns | max_total_tokens | length | env_error
    error: str | None = None  # what the environment raised, or that it hung
    info: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> EpisodeStats:
        return EpisodeStats(
            self.num_turns,
            self.tool_calls,
            self.tool_errors,
            self.tool_timeouts,
            self.ended_by,
            len(self.pieces),
            self.error is not None,
        )


def as_messages(observation: Observation) -> list[dict[str, Any]]:
    """An observation as chat messages: text is one user message."""
    if isinstance(observation, str):
        return [{"role": "user", "content": observation}]
    return [dict(message) for message in observation]


async def call_env(method: Callable[..., Any], argument: Any, timeout_s: float) -> Any:
    """An environment's reset or step, sync (in a thread) or async, for at most timeout_s."""
    if inspect.iscoroutinefunction(method):
        return await asyncio.wait_for(method(argument), timeout_s)
    return await asyncio.wait_for(asyncio.to_thread(method, argument), timeout_s)


async def run_episode(
    env: Any, row: Mapping[str, Any], generate: Generate, turns: ChatTurns, limits: EpisodeLimits
) -> Episode:
    """Play one episode of `env` on dataset row `row`.

    The conversation starts from reset(row)'s observation, or the row's prompt messages when reset returns None.
    Each model turn is sampled on every token so far (token-in/token-out: nothing is re-tokenized). A turn with
    <tool_call> blocks gets their results as tool messages; a turn without one is the environment's action (step).
    The template's tokens between turns are appended with mask 0, only when another turn follows, so every sample
    ends on a sampled token (where its reward goes). The episode ends when the environment is done or gives no
    observation, at max_turns, when the next turn would not fit max_total_tokens, when a turn hits its token cap,
    or when the environment raises or hangs (error: the sample keeps its tokens, and the run goes on)."""
    tools = tool_methods(env)
    episode = Episode(pieces=[], messages=[])
    try:
        first = await call_env(env.reset, row, limits.tool_timeout_s)
    except Exception as err:  # whatever the environment raises costs this episode only: no sample
        return _failed(episode, "reset", err, limits)
    episode.messages = as_messages(first) if first is not None else [dict(m) for m in row["prompt"]]
    piece = TokenTrajectory(turns.prompt_ids(episode.messages))
    while True:
        budget = min(limits.max_tokens_per_turn, limits.max_total_tokens - len(piece.context_ids))
        if budget <= 0:
            episode.ended_by = "max_total_tokens"
            break
        turn = await generate(piece.context_ids, budget)
        last = turn.last_weight_version if turn.last_weight_version is not None else turn.weight_version
        piece.append_sampled(turn.response_ids, turn.logprobs, turn.weight_version, last)
        episode.num_turns += 1
        text = str(turns.tokenizer.decode(turn.response_ids, skip_special_tokens=True))
        episode.messages.append({"role": "assistant", "content": text})
        if turn.finish_reason == "length":
            episode.ended_by = "length"
            break
        calls = parse_tool_calls(text)
        if calls:
            new = []
            for call in calls:
                outcome = await run_tool(tools, call, limits.tool_timeout_s)
                episode.tool_calls += 1
                episode.tool_errors += outcome.status == "error"
                episode.tool_timeouts += outcome.status == "timeout"
                new.append({"role": "tool", "name": call.name, "content": outcome.text})
        else:
            try:
                result = as_step_result(await call_env(env.step, text, limits.tool_timeout_s))
            except Exception as err:  # the episode ends here, its tokens kept
                _failed(episode, "step", err, limits)
                break
            if result.reward is not None:
                episode.reward = (episode.reward or 0.0) + result.reward
            episode.info |= result.info
            if result.done or result.observation is None:
                episode.ended_by = "done" if result.done else "no_observation"
                break
            new = as_messages(result.observation)
        if episode.num_turns >= limits.max_turns:
            episode.ended_by = "max_turns"
            break
        try:
            continuation: list[int] | None = turns.continuation_ids(episode.messages, new, turn.response_ids[-1])
            room = limits.max_total_tokens - len(piece.context_ids) - len(continuation or [])
        except HistoryRewritten:  # the template shows the next turn another history: a new sample begins there
            continuation, restart = None, turns.prompt_ids([*episode.messages, *new])
            room = limits.max_total_tokens - len(restart)
        if room <= 0:  # no token of a next turn would fit: end on this turn's sampled tokens
            episode.ended_by = "max_total_tokens"
            break
        if continuation is None:
            episode.pieces.append(piece)
            piece = TokenTrajectory(restart)
        else:
            piece.append_context(continuation)
        episode.messages += new
    episode.pieces.append(piece)
    return episode


def episode_metrics(played: Sequence[Episode | EpisodeStats]) -> dict[str, float]:
    """num_turns/{mean,max,min} (model turns per episode), tool_calls/{count,errors,timeouts} (totals),
    tool_calls/per_episode, episodes/ended_by/<reason> (fractions), episodes/split (episodes the template made into
    several samples) and episodes/env_errors."""
    episodes = [e.stats() if isinstance(e, Episode) else e for e in played]
    if not episodes:
        return {}
    turns = [episode.num_turns for episode in episodes]
    metrics = {
        "num_turns/mean": sum(turns) / len(turns),
        "num_turns/max": float(max(turns)),
        "num_turns/min": float(min(turns)),
        "tool_calls/count": float(sum(e.tool_calls for e in episodes)),
        "tool_calls/errors": float(sum(e.tool_errors for e in episodes)),
        "tool_calls/timeouts": float(sum(e.tool_timeouts for e in episodes)),
        "tool_calls/per_episode": sum(e.tool_calls for e in episodes) / len(episodes),
        "episodes/split": float(sum(e.pieces > 1 for e in episodes)),
        "episodes/env_errors": float(sum(e.env_error for e in episodes)),
    }
    for reason in sorted({e.ended_by for e in episodes}):
        metrics[f"episodes/ended_by/{reason}"] = sum(e.ended_by == reason for e in episodes) / len(episodes)
    return metrics


def _failed(episode: Episode, where: str, err: BaseException, limits: EpisodeLimits) -> Episode:
    hung = isinstance(err, TimeoutError)
    episode.ended_by = "env_error"
    episode.error = (
        f"the environment's {where} did not return within {limits.tool_timeout_s:g} s"
        if hung
        else f"the environment's {where} raised {type(err).__name__}: {err}"
    )
    return episode
