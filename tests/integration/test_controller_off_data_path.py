"""The controller holds references and per-sample scalars, not the step's data: counted as Ray serializes every
argument and result of the loop's mesh calls, in a real run of the loop with synthetic roles (real Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlmesh.train import run
from scripts.bench_controller_bytes import count_controller_bytes, synthetic_roles
from tests.conftest import compose_config

pytestmark = pytest.mark.usefixtures("ray_cluster")

PROMPTS, SAMPLES, TOKENS = 64, 4, 512


def test_the_bytes_through_the_controller_do_not_carry_the_batch(tmp_path: Path):
    cfg = compose_config(
        *synthetic_roles(str(tmp_path)),
        f"data.train_batch_size={PROMPTS}",
        f"roles.rollout.n={SAMPLES}",
        f"roles.rollout.sampling.max_tokens={TOKENS}",
        "roles.trainer.ppo_mini_batch_size=32",
        "trainer.total_steps=1",
    )
    with count_controller_bytes() as counts:
        history = run(cfg)
    assert len(history) == 1
    through_controller = sum(sent + received for sent, received in counts.values())
    # One per-token field alone (the int64 response ids) is 1 MB; the step's batch has about ten such fields, and
    # before the data left the controller it passed through it about six times a step (~60 MB).
    one_field = PROMPTS * SAMPLES * TOKENS * 8
    assert through_controller < 0.1 * one_field, dict(counts)
    # Generation comes back as (rows, summary) heads: per-sample scalars at most, never the tokens.
    assert counts["rollout.generate"][1] < 0.05 * one_field
