"""Environments and tools for multi-turn rollouts: the reset/step contract, tool schemas and calls, token buffers."""

from rlmesh.envs.multi_turn import Episode, EpisodeLimits, EpisodeStats, episode_metrics, run_episode
from rlmesh.envs.protocol import Environment, StepResult, TRLEnvironment, as_step_result, tool_methods, tool_schemas
from rlmesh.envs.tool_calls import ToolCall, ToolOutcome, parse_tool_calls, run_tool
from rlmesh.envs.trajectory import ChatTurns, HistoryRewritten, TokenTrajectory

__all__ = [
    "ChatTurns",
    "Environment",
    "Episode",
    "EpisodeLimits",
    "EpisodeStats",
    "HistoryRewritten",
    "StepResult",
    "TRLEnvironment",
    "TokenTrajectory",
    "ToolCall",
    "ToolOutcome",
    "as_step_result",
    "episode_metrics",
    "parse_tool_calls",
    "run_episode",
    "run_tool",
    "tool_methods",
    "tool_schemas",
]
