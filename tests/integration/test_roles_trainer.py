"""A dp=2 PolicyTrainer mesh on real Ray (DDP and FSDP2 over gloo) against one in-process trainer on the same data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlmesh.config import OptimConfig
from rlmesh.engine.model_io import read_hf_weights
from rlmesh.mesh import ActorMesh
from rlmesh.roles.trainer import PolicyTrainer
from tests.integration.roles_fixtures import (
    DigestTrainer,
    actor_config,
    rollout_batch,
    save_tiny_policy,
    weights_digest,
)

pytestmark = pytest.mark.usefixtures("ray_cluster")

ROLLOUT_N = 4
DP = 2


def settings(strategy: str) -> dict:
    # Token-mean over responses of different lengths, entropy and KL terms, 2 epochs and a warmup: the per-rank
    # loss scaling must make the dp=2 gradient equal the dp=1 one for all of it. DDP splits each rank's 4 rows
    # into micro-batches of 3 + 1 (8 rows alone: 3 + 3 + 2). FSDP2 uses a 12-token budget, which gives the two
    # ranks 3 and 2 micro-batches: they must agree on one count, since every forward gathers parameters.
    micro_batching = (
        {"ppo_micro_batch_size_per_device": 3}
        if strategy == "ddp"
        else {"use_dynamic_bsz": True, "ppo_max_token_len_per_device": 12}
    )
    return {
        "strategy": strategy,
        "ppo_mini_batch_size": 2,
        "ppo_epochs": 2,
        "entropy_coeff": 0.01,
        "use_kl_loss": True,
        "optim": OptimConfig(lr=1e-3, lr_warmup_steps=1, lr_scheduler="cosine"),
        **micro_batching,
    }


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_policy(tmp_path_factory.mktemp("policy"))


@pytest.fixture(params=["ddp", "fsdp2"])
def meshes(
    request: pytest.FixtureRequest, policy_path: str
) -> Iterator[tuple[ActorMesh[DigestTrainer], DigestTrainer]]:
    strategy = request.param
    kwargs = {"rollout_n": ROLLOUT_N, "total_training_steps": 10, "seed": 0, "device": "cpu"}
    mesh = ActorMesh(
        DigestTrainer,
        {"dp": DP},
        args=(actor_config(policy_path, **settings(strategy)),),
        kwargs=kwargs,
        resources={"CPU": 0.5},
        name=f"trainer-{strategy}",
    )
    single = DigestTrainer(actor_config(policy_path, **settings(strategy)), **kwargs)  # in-process: dp=1
    yield mesh, single
    mesh.shutdown()


def with_old_logprobs(batch, trainer: PolicyTrainer):
    batch["old_logprobs"] = trainer.compute_logprobs(batch)["old_logprobs"]
    noise = torch.randn(batch["old_logprobs"].shape, generator=torch.Generator().manual_seed(0))
    batch["ref_logprobs"] = batch["old_logprobs"] + 0.1 * noise * batch["response_mask"]
    return batch


def test_a_dp2_mesh_scores_and_updates_exactly_like_one_process(
    meshes: tuple[ActorMesh[DigestTrainer], DigestTrainer], policy_path: str, tmp_path: Path
) -> None:
    mesh, single = meshes
    batch = rollout_batch(2 * ROLLOUT_N, seed=1, temperature=0.8)
    scored = mesh.compute_logprobs.shard(batch).result(timeout=120)
    expected = single.compute_logprobs(batch)
    valid = batch["response_mask"].bool()
    torch.testing.assert_close(scored["old_logprobs"][valid], expected["old_logprobs"][valid], rtol=0, atol=1e-6)
    torch.testing.assert_close(scored["entropy"][valid], expected["entropy"][valid], rtol=0, atol=1e-6)

    batch = with_old_logprobs(batch, single)
    metrics = mesh.update.shard(batch).result(timeout=120)
    expected_metrics = single.update(batch)
    assert metrics.keys() == expected_metrics.keys()
    for name, value in expected_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name

    digests = mesh.weights_digest.all().result(timeout=120)
    assert digests[0] == digests[1]  # both ranks stepped with the same averaged gradient
    exported = mesh.export_weights.all().result(timeout=120)
    assert exported[1] is None and exported[0] is not None
    expected_weights = single.export_weights()
    assert expected_weights is not None and exported[0].keys() == expected_weights.keys()
    # Adam divides by sqrt(v): where a gradient is ~0, float noise in it (a different summation order over ranks)
    # can move a few elements by a visible fraction of lr. So: every element within 5% of one lr step, and on
    # average the two runs differ by less than 1e-5 of how far training moved the weights.
    initial = read_hf_weights(policy_path)
    dp2 = torch.cat([exported[0][name].flatten() for name in sorted(expected_weights)])
    dp1 = torch.cat([expected_weights[name].flatten() for name in sorted(expected_weights)])
    start = torch.cat([initial[name].flatten() for name in sorted(expected_weights)])
    assert (dp2 - dp1).abs().max() < 0.05 * 1e-3
    assert (dp2 - dp1).abs().mean() < 1e-5 * (dp1 - start).abs().mean()

    # Save, update, restore, update again: the mesh resumes to bitwise the same weights and metrics.
    mesh.save_checkpoint.all(str(tmp_path / "ckpt")).result(timeout=120)
    assert sorted(p.name for p in (tmp_path / "ckpt" / "policy_state").iterdir()) == ["rank0.pt", "rank1.pt"]
    second = with_old_logprobs(rollout_batch(2 * ROLLOUT_N, seed=2, temperature=0.8), single)
    after = mesh.update.shard(second).result(timeout=120)
    after_digest = mesh.weights_digest.all().result(timeout=120)
    mesh.load_checkpoint.all(str(tmp_path / "ckpt")).result(timeout=120)
    assert mesh.weights_digest.all().result(timeout=120) == digests
    assert mesh.update.shard(second).result(timeout=120) == after
    assert mesh.weights_digest.all().result(timeout=120) == after_digest
    assert weights_digest(exported[0]) != after_digest[0]
