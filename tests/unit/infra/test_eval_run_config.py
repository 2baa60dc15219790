"""rlmesh eval on a run's checkpoint uses that run's saved config, with the command line's overrides on top."""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf

import rlmesh.train  # noqa: F401  # registers the config schema with Hydra
from rlmesh.checkpoint import COMPLETE_MARKER
from rlmesh.eval import run_config_of, with_run_config
from tests.conftest import REPO, compose_config


def fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_000002"
    shutil.copytree(REPO / "rlmesh" / "assets" / "tiny-arith", step / "policy")
    (step / COMPLETE_MARKER).write_text("")
    trained = compose_config("rollout=hf", "data.val_size=16", "roles.reward.timeout_s=3", "trainer.seed=7")
    OmegaConf.save(trained, run / "config.yaml", resolve=True)
    return run


def test_a_runs_checkpoint_is_evaluated_with_the_runs_config_and_the_overrides_on_top(tmp_path: Path):
    run = fake_run(tmp_path)
    assert run_config_of(str(run)) == run / "config.yaml"
    assert run_config_of(str(run / "checkpoints" / "step_000002")) == run / "config.yaml"
    overrides = [f"eval.checkpoint={run}", "roles.rollout.val_n=4", "recipe=ppo"]
    cfg = with_run_config(compose_config(*overrides), overrides)
    assert cfg.data.val_size == 16 and cfg.roles.reward.timeout_s == 3 and cfg.trainer.seed == 7  # the run's
    assert cfg.roles.rollout._target_.endswith("HFRollout")  # the run's rollout, not the composed default
    assert cfg.roles.rollout.val_n == 4 and cfg.eval.checkpoint == str(run)  # the command line's
    assert cfg.recipe == "grpo"  # a config-group choice the run made: ignored, with a warning


def test_an_hf_folder_or_use_run_config_false_keeps_the_composed_config(tmp_path: Path):
    run = fake_run(tmp_path)
    composed = compose_config(f"eval.checkpoint={run}", "eval.use_run_config=false")
    assert with_run_config(composed, []) is composed
    folder = compose_config(f"eval.checkpoint={REPO / 'rlmesh' / 'assets' / 'tiny-arith'}")
    assert with_run_config(folder, []) is folder and run_config_of(str(tmp_path / "nowhere")) is None
