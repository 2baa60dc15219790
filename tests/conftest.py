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
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}},
    )
    try:
        yield
    finally:
        ray.shutdown()


def compose_config(*overrides: str) -> DictConfig:
    """The project's Hydra config (configs/config.yaml) with `overrides`, as `python -m rlmesh.train` composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))
