"""ReMax's baseline: each prompt's greedy response is generated and scored, and its reward is the baseline of every
sampled row of that prompt, in the rows' order. The rows are StoredRows in a real local Ray's object store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rlmesh.batch_stages import reward_summary
from rlmesh.config import RlmeshConfig
from rlmesh.data import Batch
from rlmesh.loop import RLLoop, Roles
from rlmesh.mesh import Stored, StoredRows

pytestmark = pytest.mark.usefixtures("ray_cluster")


class Scored:
    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def result(self, metrics: dict[str, float]) -> Stored[Batch, Batch]:
        return Stored(StoredRows.put(self.batch), reward_summary(self.batch))


def make_loop(tmp_path: Path, estimator: str, n: int, calls: list[tuple[int, float]]) -> RLLoop:
    cfg = RlmeshConfig()
    cfg.algorithm.adv_estimator, cfg.roles.rollout.n = estimator, n
    roles = Roles(None, None, None, None, None, None)  # type: ignore[arg-type]
    loop = RLLoop(cfg, roles, None, [], 0, tmp_path, None)  # type: ignore[arg-type]

    def generate(prompts: list[Any], n: int, sampling: Any, step: int, fixed_widths: bool = False) -> StoredRows[Batch]:
        calls.append((n, sampling.temperature))
        rows = [p for p in prompts for _ in range(n)]
        # The response is the prompt's index, so a score can say which prompt a row came from.
        return StoredRows.put(
            Batch.from_generations(
                [[1, 2] for _ in rows], [[p["index"]] for p in rows], [[-0.5] for _ in rows], pad_token_id=0
            )
        )

    def score(rows: StoredRows[Batch]) -> Scored:
        batch = rows.fetch()
        greedy_reward = batch["response_ids"][:, 0].float() * 10  # prompt i's greedy response scores 10 i
        scores = torch.zeros(batch["response_mask"].shape)
        scores[:, -1] = greedy_reward
        return Scored(Batch({"token_level_scores": scores}))

    loop.generate, loop.score = generate, score  # type: ignore[method-assign]
    return loop


def test_remax_rows_get_their_prompts_greedy_reward(tmp_path: Path):
    calls: list[tuple[int, float]] = []
    loop = make_loop(tmp_path, "remax", n=3, calls=calls)
    prompts = [{"index": i} for i in (4, 7)]
    rows = loop.draw(prompts, step=1, metrics={}, fixed_widths=False)
    batch = rows.fetch()
    assert calls == [(3, 1.0), (1, 0.0)]  # the samples, then one greedy response per prompt
    assert batch["baseline_rewards"].tolist() == [40.0, 40.0, 40.0, 70.0, 70.0, 70.0]
    assert batch["response_ids"][:, 0].tolist() == [4, 4, 4, 7, 7, 7]  # the rows the baselines line up with
    again = loop.draw([{"index": 2}], step=2, metrics={}, fixed_widths=False)
    joined = StoredRows.concat([rows, again]).fetch()  # dynamic sampling's concat
    assert joined["baseline_rewards"].tolist()[-3:] == [20.0] * 3


def test_estimators_without_a_baseline_generate_no_greedy_responses(tmp_path: Path):
    calls: list[tuple[int, float]] = []
    rows = make_loop(tmp_path, "grpo", n=2, calls=calls).draw([{"index": 1}], step=1, metrics={}, fixed_widths=False)
    assert calls == [(2, 1.0)] and "baseline_rewards" not in rows.fetch()
