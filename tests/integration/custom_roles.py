"""User-defined role classes, swapped in through `_target_` by the role-swap test (no rlmesh code changes)."""

from __future__ import annotations

from typing import Any

import torch

from rlmesh.data import Batch
from rlmesh.mesh import endpoint
from rlmesh.roles.rollout.base import Sample


class HalfReward:
    """Scores every response 0.5, whatever it says."""

    def __init__(self, config: Any, *, tokenizer_path: str, max_response_length: int) -> None:
        self.calls = 0

    @endpoint
    def score(self, batch: Batch) -> Batch:
        self.calls += 1
        mask = batch["response_mask"]
        scores = torch.zeros(mask.shape, dtype=torch.float32)
        last = (mask.sum(-1) - 1).clamp(min=0)
        scores[torch.arange(len(batch)), last] = 0.5
        out = Batch({"token_level_scores": scores}, size=len(batch))
        out["score"] = [0.5] * len(batch)
        return out


class EchoRollout:
    """Answers every prompt with its own last two tokens, n times, with made-up log-probs."""

    def __init__(self, config: Any, model: Any, *, seed: int, device: str) -> None:
        self.version = 0

    @endpoint
    async def generate(
        self, prompt_ids: list[int], n: int, sampling: Any = None, seed: int | None = None
    ) -> list[Sample]:
        response = list(prompt_ids[-2:])
        return [Sample(list(prompt_ids), response, [-0.5] * len(response), self.version) for _ in range(n)]

    @endpoint
    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        self.version = version

    @endpoint
    def weight_version(self) -> int:
        return self.version
