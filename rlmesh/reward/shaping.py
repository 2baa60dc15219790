"""Reward shaping on top of a compute_score: a format bonus or penalty by regex, and DAPO's overlong penalty."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rlmesh.reward.registry import ComputeScore


@dataclass(frozen=True)
class FormatReward:
    """Wraps a compute_score: adds `bonus` when `pattern` is found in the response, `penalty` when it is not.

    E.g. FormatReward(load_compute_score(), r"<think>.*?</think>", bonus=0.1) for an R1-style template. The result is
    a dict with the adjusted 'score', the wrapped scorer's extras, and 'format' (whether the pattern matched) so the
    format rate shows in the metrics. The pattern is searched with re.DOTALL over the whole response; a pattern that
    backtracks badly is stopped by RewardScorer's time limit like any slow scorer. It pickles (the pattern as text),
    so it runs in the scorer's worker processes.
    """

    compute_score: ComputeScore
    pattern: str
    bonus: float = 0.0
    penalty: float = 0.0

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as error:
            raise ValueError(
                f"format pattern {self.pattern!r} is not a valid regex ({error}); fix the pattern"
            ) from error

    def __call__(
        self, data_source: str, solution_str: str, ground_truth: Any, extra_info: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        result = self.compute_score(data_source, solution_str, ground_truth, extra_info)
        extras = dict(result) if isinstance(result, dict) else {"score": result}
        # re caches compiled patterns, so compiling per call costs a dict lookup.
        matched = re.search(self.pattern, solution_str, flags=re.DOTALL) is not None
        extras["score"] = float(extras["score"]) + (self.bonus if matched else self.penalty)
        extras["format"] = matched
        return extras


def overlong_penalty(
    response_length: int, max_response_length: int, overlong_buffer_len: int, penalty_factor: float = 1.0
) -> float:
    """DAPO's soft overlong punishment, added to the task reward (Yu et al. 2025, eq. 13), with L = response_length,
    L_max = max_response_length, L_cache = overlong_buffer_len:

        0                                          if L <= L_max - L_cache
        (L_max - L_cache - L) / L_cache * factor   if L_max - L_cache < L <= L_max   (linear from 0 to -factor)
        -factor                                    if L > L_max
    """
    if not 0 < overlong_buffer_len <= max_response_length:
        raise ValueError(
            f"overlong_buffer_len must be in (0, max_response_length={max_response_length}], got {overlong_buffer_len}"
        )
    expected_length = max_response_length - overlong_buffer_len
    exceed = min(response_length, max_response_length) - expected_length
    return -exceed / overlong_buffer_len * penalty_factor if exceed > 0 else 0.0
