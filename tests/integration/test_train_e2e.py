"""The framework end to end on real Ray with the tiny model: GRPO and PPO steps, resume equality, role swap."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from omegaconf import DictConfig, OmegaConf

from rlmesh.config_checks import ConfigError, check_config
from rlmesh.train import build_roles, run
from tests.conftest import REPO, SMALL_RUN, compose_config

pytestmark = pytest.mark.usefixtures("ray_cluster")

SMALL = [*SMALL_RUN, "data.val_size=16", "trainer.logger=[jsonl,tensorboard]"]


def config(tmp_path: Path, *overrides: str) -> DictConfig:
    return compose_config(*SMALL, f"trainer.output_dir={tmp_path}", *overrides)


def read_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {int(row["step"]): row for row in lines}


def test_grpo_steps_update_the_policy_and_write_everything(tmp_path: Path):
    history = run(config(tmp_path, "trainer.total_steps=3", "trainer.test_freq=3", "trainer.save_freq=3"))
    assert len(history) == 3
    for metrics in history:
        for key in (
            "actor/pg_loss",
            "actor/grad_norm",
            "critic/score/mean",
            "response_length/mean",
            "timing_s/gen",
            "timing_s/update_actor",
            "timing_s/update_weights",
            "perf/throughput",
            "rollout_corr/kl",  # the mismatch dashboard is on with the correction off (here in bypass mode)
            "rollout_corr/log_ppl_abs_diff",
        ):
            assert key in metrics and math.isfinite(metrics[key]), key
    assert any(m["actor/grad_norm"] > 0 for m in history)
    assert "val-core/arithmetic/acc/mean@1" in history[-1]
    logged = read_metrics(tmp_path)
    assert set(logged) == {0, 1, 2, 3}  # validation before training, then each step
    assert list((tmp_path / "tensorboard").glob("events.*"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `rlmesh plot` overlays this real run folder on a verl console log of the same metric names.
    from rlmesh.cli import main
    from rlmesh.plotting import read_run, runs_figure

    verl_log = tmp_path / "verl.log"
    verl_log.write_text("".join(f"step:{s} - critic/score/mean:{0.1 * s} - actor/entropy:1.0\n" for s in (1, 2, 3)))
    assert main(["plot", str(tmp_path), str(verl_log), "-o", str(tmp_path / "overlay.png")]) == 0
    assert (tmp_path / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [a.get_title() for a in runs_figure([read_run(tmp_path), read_run(verl_log)]).axes if a.get_visible()]
    for drawn in ("reward", "validation accuracy", "entropy", "grad norm", "rollout vs trainer", "time per step"):
        assert any(title.startswith(drawn) for title in titles), (drawn, titles)
    # each step's trace: the controller's phases and every role actor's endpoint calls, with rank and coordinates
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == [f"step_00000{s}.json" for s in (1, 2, 3)]
    events = json.loads((tmp_path / "traces" / "step_000002.json").read_text())["traceEvents"]
    names = {e["args"]["name"]: e["pid"] for e in events if e["name"] == "process_name"}
    assert {"controller", "trainer", "rollout", "reward"} <= set(names)
    spans = [e for e in events if e["ph"] == "X"]

    def spans_of(process: str) -> set[str]:
        return {e["name"] for e in spans if e["pid"] == names[process]}

    assert {"gen", "update_actor", "update_weights"} <= spans_of("controller")
    assert {"generate", "load_weights"} <= spans_of("rollout") and "update" in spans_of("trainer")
    assert "score" in spans_of("reward")
    generate = [e for e in spans if e["name"] == "generate"]
    assert len(generate) == 8 and all(e["args"]["weight_version"] == 1 for e in generate)  # step 2 samples v1
    assert all(e["dur"] > 0 and e["args"]["coords"] == {"dp": 0} for e in generate)
    update = next(e for e in spans if e["name"] == "update_actor")
    inside = next(e for e in spans if e["name"] == "update" and e["pid"] == names["trainer"])
    assert update["ts"] <= inside["ts"] and inside["ts"] + inside["dur"] <= update["ts"] + update["dur"] + 1e3
    checkpoint = tmp_path / "checkpoints" / "step_000003"
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(checkpoint / "policy")
    base = AutoModelForCausalLM.from_pretrained(history and str(REPO / "rlmesh" / "assets" / "tiny-arith"))
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "three updates left every weight unchanged"


def test_ppo_steps_train_a_critic(tmp_path: Path):
    """With packed forwards (model.use_remove_padding): the trainer's and critic's forwards run on real Ray on the
    real tokens only; the padded ones run in every other test."""
    history = run(
        config(
            tmp_path,
            "recipe=ppo",
            "model.use_remove_padding=true",
            "algorithm.recompute_old_logprobs=true",
            "algorithm.rollout_correction.rollout_is=sequence",
            "algorithm.rollout_correction.rollout_rs=token",
            "roles.critic.ppo_mini_batch_size=4",
            "roles.critic.ppo_micro_batch_size_per_device=8",
            "roles.critic.resources_per_device={CPU: 0.5}",
            "trainer.total_steps=2",
            "trainer.test_freq=-1",
            "trainer.save_freq=0",
        )
    )
    for metrics in history:
        for key in ("critic/vf_loss", "critic/values/mean", "critic/returns/mean", "actor/pg_loss"):
            assert math.isfinite(metrics[key]), key
    assert history[0]["critic/vf_loss"] != history[1]["critic/vf_loss"]
    # The trainer's packed log-probs on the rollout's weights are the ones HF generate sampled from; several
    # sequences sharing a row and attending to each other would be off by far more.
    assert history[0]["training/rollout_probs_diff_max"] < 1e-5
    # Decoupled correction on the same numbers: weights of 1 reach the trainer and nothing is rejected.
    assert history[0]["rollout_corr/rollout_is_max"] == pytest.approx(1.0, abs=1e-4)
    assert history[0]["rollout_corr/rollout_rs_masked_fraction"] == 0.0


@pytest.mark.parametrize("recipe", ["rloo", "reinforce_pp", "dapo", "drgrpo", "remax"])
def test_every_other_recipe_runs_its_algorithm_end_to_end(tmp_path: Path, recipe: str):
    history = run(
        config(tmp_path, f"recipe={recipe}", "trainer.total_steps=2", "trainer.test_freq=-1", "trainer.save_freq=0")
    )
    assert [m["training/global_step"] for m in history] == [1.0, 2.0]
    for metrics in history:
        assert math.isfinite(metrics["actor/pg_loss"]) and math.isfinite(metrics["actor/grad_norm"])
        assert metrics["actor/grad_norm"] > 0  # the estimator gave some sample a non-zero advantage
    if recipe == "dapo":
        # The base model solves ~18%, so many groups of 4 score all 0 and get filtered out: a step draws again and
        # concatenates the draws (which once failed on their different padded widths).
        assert max(m["dynamic_sampling/gen_batches"] for m in history) >= 2
    if recipe == "remax":  # the greedy baseline was generated and scored every step
        assert all(m["timing_s/gen_max"] > 0 for m in history)


def test_a_kl_penalty_in_the_reward_feeds_the_adaptive_kl_controller(tmp_path: Path):
    overrides = ["algorithm.use_kl_in_reward=true", "algorithm.kl_ctrl.type=adaptive", "roles.reference.enable=true"]
    history = run(config(tmp_path, *overrides, "trainer.total_steps=3", "trainer.test_freq=-1", "trainer.save_freq=0"))
    coefficients = [m["actor/reward_kl_penalty_coeff"] for m in history]
    assert coefficients[0] == 0.001  # the configured kl_coef, used for step 1
    # The adaptive controller moves the coefficient after each step by the KL it measured (verl's AdaptiveKLController)
    assert coefficients[1] != coefficients[0] and coefficients[2] != coefficients[1]
    assert all(math.isfinite(m["actor/reward_kl_penalty"]) for m in history)
    # Once the policy has moved from the reference, the penalised rewards differ from the scores (the k1 estimate
    # of the KL can have either sign, so only the difference is certain)
    assert history[-1]["actor/reward_kl_penalty"] != 0.0
    assert history[-1]["critic/rewards/mean"] != history[-1]["critic/score/mean"]


def test_user_defined_reward_and_rollout_classes_plug_in_by_target(tmp_path: Path):
    """Two classes that inherit from nothing of rlmesh's play the scorer and the rollout, chosen by _target_ alone:
    no vLLM check, no collective transport (the plan reads what the classes can do)."""
    overrides = (
        "roles.reward._target_=tests.integration.custom_roles.HalfReward",
        "roles.rollout._target_=tests.integration.custom_roles.PlainHFRollout",
    )
    cfg = config(tmp_path, *overrides, "trainer.total_steps=2", "trainer.test_freq=-1", "trainer.save_freq=0")
    plan = check_config(OmegaConf.to_object(cfg))  # type: ignore[arg-type]
    assert plan.weight_sync == "object_store" and plan.role("rollout").cls.__name__ == "PlainHFRollout"
    history = run(cfg)
    assert [m["training/global_step"] for m in history] == [1.0, 2.0]
    assert all(m["critic/score/mean"] == 0.5 for m in history)  # the user's scorer scored every response
    # The recipe trains on the rollout's own log-probs (no recompute): the trainer's agree with them only if they
    # really are what HF generate sampled from (made-up ones, as a stub would return, are far off).
    assert abs(history[0]["actor/ppo_kl"]) < 1e-4


def test_a_role_class_missing_an_endpoint_fails_before_any_actor_starts(tmp_path: Path, monkeypatch):
    import rlmesh.train

    def tripwire(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a mesh started for a class that cannot play its role")

    monkeypatch.setattr(rlmesh.train, "start_ray", tripwire)
    cfg = config(tmp_path, "roles.reward._target_=tests.integration.custom_roles.ScorerWithoutScore")
    with pytest.raises(ConfigError, match=r"ScorerWithoutScore has no endpoint score\(batch\) \(is not marked"):
        run(cfg)


def test_colocated_engines_share_the_trainers_bundles_and_take_its_weights(tmp_path: Path):
    cfg = OmegaConf.to_object(
        config(
            tmp_path,
            "roles.rollout.colocate_with_trainer=true",
            "roles.trainer.dp_size=2",
            "roles.rollout.num_engines=2",
        )
    )
    plan = check_config(cfg)  # type: ignore[arg-type]
    with contextlib.ExitStack() as release:
        roles = build_roles(cfg, plan, total_steps=1, release=release)  # type: ignore[arg-type]
        shared = roles.trainer.placement
        assert roles.rollout.placement.group.id == shared.group.id
        assert shared.bundles == [{"CPU": 1.0}] * 2  # a trainer rank's 0.5 CPU and an engine's 0.5 in each
        roles.weight_sync.setup()
        roles.weight_sync.push(version=1)
        assert roles.rollout.weight_version.all().result(timeout=60) == [1, 1]
    assert ray.util.placement_group_table(shared.group)["state"] == "REMOVED"  # released with the meshes
