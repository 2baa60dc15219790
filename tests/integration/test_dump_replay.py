"""trainer.dump_rollouts and trainer.replay_rollouts on real Ray: a dumped run, replayed with no engines, trains on
the same samples to the same losses and weights; the dump's pages show the samples and the log-prob gap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from rlmesh.config_checks import ConfigError, check_config
from rlmesh.roles.rollout.replay import ReplayRollout
from rlmesh.train import run
from tests.conftest import SMALL_RUN, compose_config

pytestmark = pytest.mark.usefixtures("ray_cluster")

STEPS = ["trainer.total_steps=3", "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.logger=[jsonl]"]
EXACT = (
    "actor/pg_loss",
    "actor/grad_norm",
    "actor/entropy",
    "actor/ppo_kl",
    "critic/score/mean",
    "critic/advantages/mean",
)


def final_policy(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run_dir / "checkpoints").glob("step_*")) / "policy" / "model.safetensors")


def test_a_dumped_run_replays_to_the_same_losses_and_weights_without_engines(tmp_path: Path):
    dump = tmp_path / "dump"
    original = run(
        compose_config(*SMALL_RUN, *STEPS, f"trainer.output_dir={tmp_path / 'a'}", f"trainer.dump_rollouts={dump}")
    )
    assert sorted(p.name for p in dump.iterdir()) == [f"step_00000{s}.{e}" for s in (1, 2, 3) for e in ("html", "pt")]
    step = torch.load(dump / "step_000002.pt", weights_only=True)
    assert len(step["seed"]) == 8 and all(len(group) == 4 for group in step["samples"])  # 8 prompts x n=4
    # the fp32 HF engine and the trainer agree on every sampled token's log-prob
    gaps = [
        abs(t - r)
        for group, trainer in zip([s for g in step["samples"] for s in g], step["trainer_logprobs"], strict=True)
        for t, r in zip(trainer, group["logprobs"], strict=True)
    ]
    assert gaps and max(gaps) < 1e-4
    page = (dump / "step_000002.html").read_text()
    assert page.count("<tr>") == 1 + 32 and "gap" in page and "2/" in page  # a header and a row per sample

    replay = compose_config(
        *SMALL_RUN, *STEPS, f"trainer.output_dir={tmp_path / 'b'}", f"trainer.replay_rollouts={dump}"
    )
    plan = check_config(OmegaConf.to_object(replay))  # type: ignore[arg-type]
    assert next(spec for spec in plan.roles if spec.name == "rollout").cls is ReplayRollout
    assert plan.weight_sync == "none"  # nothing is pushed to a replay
    replayed = run(replay)
    for before, after in zip(original, replayed, strict=True):
        for key in EXACT:
            assert after[key] == before[key], (key, before["training/global_step"])
    weights, again = final_policy(tmp_path / "a"), final_policy(tmp_path / "b")
    assert all(torch.equal(weights[name], again[name]) for name in weights)


def test_replaying_a_folder_without_dumped_steps_is_refused_before_any_actor_starts(tmp_path: Path):
    cfg = OmegaConf.to_object(compose_config(*SMALL_RUN, f"trainer.replay_rollouts={tmp_path}"))
    with pytest.raises(ConfigError, match=r"trainer\.replay_rollouts=.*not a folder of dumped steps"):
        check_config(cfg)  # type: ignore[arg-type]
