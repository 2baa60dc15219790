"""Shared fixtures: one local Ray cluster per test session, bound to 127.0.0.1 and stopped at the end."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
# Enough logical CPUs for every actor the suite creates at once; fractional per-actor requests keep this honest.
RAY_NUM_CPUS = 16


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(
        num_cpus=RAY_NUM_CPUS,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                "RLMESH_BIND_HOST": "127.0.0.1",  # as a local `python -m rlmesh.train` sets it
            }
        },
    )
    try:
        yield
    finally:
        ray.shutdown()


# A small, fast configuration of the embedded default: 8 prompts × 4 samples a step on the HF backend (no engine
# start, and batch-invariant, so runs compare exactly); tests/integration/test_main_job.py covers the default (vLLM).
SMALL_RUN = [
    "rollout=hf",
    "data.train_batch_size=8",
    "roles.rollout.n=4",
    "roles.trainer.ppo_mini_batch_size=4",
    "roles.trainer.ppo_micro_batch_size_per_device=8",
    "roles.trainer.resources_per_device={CPU: 0.5}",
    "roles.rollout.resources_per_engine={CPU: 0.5}",
    "roles.reward.resources_per_actor={CPU: 0.25}",
    "trainer.progress_bar=false",
]


def compose_config(*overrides: str) -> DictConfig:
    """The project's Hydra config (configs/config.yaml) with `overrides`, as `python -m rlmesh.train` composes it."""
    from hydra import compose, initialize_config_dir

    import rlmesh.train  # noqa: F401  # registers the config schema and the asset resolver the config names

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# Metrics that depend on timing, and those computed from float reductions whose order can change with how requests
# were batched (the rollout's old log-probs differ by ~1e-7 between identical runs, so the PPO losses do too).
NOT_REPRODUCIBLE = ("timing_s/", "perf/", "sync/", "weight_sync/", "trainer/idle_ratio", "rollouter/idle_ratio")
FLOAT_REDUCTIONS = ("actor/", "critic/values", "critic/returns", "critic/vf")

# Log-prob differences and the mismatch metrics made from them: their noise is that of the log-probs, absolute near 0
# (a fresh clone measured ppo_kl -1.914051e-4 against -1.914163e-4), relative for perplexities.
LOGPROB_DIFFERENCES = ("actor/ppo_kl", "rollout_corr/")


def assert_same_run(want: list[dict[str, float]], got: list[dict[str, float]]) -> None:
    """Two runs' step metrics agree: exactly where they follow from the sampled tokens and scores (a resume bug
    changes those outright), to 1e-5 relative where float reductions make them, to 1e-7 for log-prob differences."""
    import pytest

    assert [m["training/global_step"] for m in got] == [m["training/global_step"] for m in want]
    for expected, actual in zip(want, got, strict=True):
        step = int(expected["training/global_step"])
        assert set(expected) <= set(actual), f"step {step}: missing {sorted(set(expected) - set(actual))}"
        for key, value in expected.items():
            if key.startswith(NOT_REPRODUCIBLE):
                continue
            if key.startswith(LOGPROB_DIFFERENCES):
                assert actual[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"step {step}: {key}"
            elif key.startswith(FLOAT_REDUCTIONS):
                assert actual[key] == pytest.approx(value, rel=1e-5, abs=1e-9), f"step {step}: {key}"
            else:
                assert actual[key] == value, f"step {step}: {key} {actual[key]} != {value}"
