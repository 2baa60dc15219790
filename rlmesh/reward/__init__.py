"""Rewards: verl-compatible compute_score functions, built-in scorers by data_source, parallel scoring with limits."""

from rlmesh.reward.registry import (
    BUILTIN_SCORERS,
    ComputeScore,
    LoadedComputeScore,
    UnknownDataSourceError,
    builtin_scorer,
    default_compute_score,
    load_compute_score,
)
from rlmesh.reward.scorer import RewardScorer, ScoreItem, ScoreResult
from rlmesh.reward.shaping import FormatReward, overlong_penalty

__all__ = [
    "BUILTIN_SCORERS",
    "ComputeScore",
    "FormatReward",
    "LoadedComputeScore",
    "RewardScorer",
    "ScoreItem",
    "ScoreResult",
    "UnknownDataSourceError",
    "builtin_scorer",
    "default_compute_score",
    "load_compute_score",
    "overlong_penalty",
]
