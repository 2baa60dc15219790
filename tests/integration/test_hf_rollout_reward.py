"""HFRollout and RuleReward as meshes on real Ray: concurrent generate.choose, weight versions, ordered score.shard."""

from __future__ import annotations

import pytest
import torch

from rlmesh.config import ModelConfig, RewardConfig, RolloutConfig, SamplingConfig
from rlmesh.data.batch import Batch
from rlmesh.mesh import ActorMesh, wait_all
from rlmesh.models.tiny import build_char_tokenizer, build_tiny_qwen2, save_tiny_model
from rlmesh.roles.reward import RuleReward
from rlmesh.roles.rollout.hf import HFRollout

pytestmark = pytest.mark.usefixtures("ray_cluster")

TOKENIZER = build_char_tokenizer()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    model = build_tiny_qwen2(
        TOKENIZER, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32, initializer_range=0.3
    )
    return str(save_tiny_model(model, TOKENIZER, tmp_path_factory.mktemp("tiny_qwen2_ray")))


def encode(text: str) -> list[int]:
    return list(TOKENIZER.encode(text, add_special_tokens=False))


def test_rollout_mesh_serves_concurrent_requests_and_weight_versions(model_path: str) -> None:
    config = RolloutConfig(sampling=SamplingConfig(max_tokens=6), generation_batch_size=32)
    mesh = ActorMesh(
        HFRollout,
        2,
        args=(config, ModelConfig(path=model_path)),
        kwargs={"seed": 0, "device": "cpu"},
        resources={"CPU": 0.5},
        name="hf_rollout",
    )
    try:
        prompts = [encode(f"{i}+{2 * i}=") for i in range(32)]
        results = wait_all([mesh.generate.choose(prompt, 4, None, 1000 + i) for i, prompt in enumerate(prompts)])
        assert [len(samples) for samples in results] == [4] * 32
        for prompt, samples in zip(prompts, results, strict=True):
            assert all(s.prompt_ids == prompt and s.weight_version == 0 for s in samples)
            assert all(1 <= len(s.response_ids) <= 6 and len(s.logprobs) == len(s.response_ids) for s in samples)
        stats = mesh.generation_stats.all().result()
        assert all(actor["generated_tokens"] > 0 for actor in stats), "both engines should have served requests"
        # A seeded request gives the same samples whichever engine serves it.
        on_each = mesh.generate.all(prompts[0], 4, None, 1000).result()
        assert all([s.response_ids for s in samples] == [s.response_ids for s in results[0]] for samples in on_each)

        model = build_tiny_qwen2(
            TOKENIZER, seed=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32
        )
        weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        mesh.load_weights.all(weights, 1).result()
        assert mesh.weight_version.all().result() == [1, 1]
        after = wait_all([mesh.generate.choose(prompt, 2) for prompt in prompts[:8]])
        assert all(s.weight_version == 1 for samples in after for s in samples)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompts[0] + [5, 6]])).logits[0].log_softmax(-1)
        expected = [float(logits[len(prompts[0]) - 1, 5]), float(logits[len(prompts[0]), 6])]
        for served in mesh.compute_logprobs_of.all(prompts[0], [5, 6]).result():
            assert served == pytest.approx(expected, abs=1e-5)
    finally:
        mesh.shutdown()


def test_reward_mesh_scores_shards_in_row_order(model_path: str) -> None:
    mesh = ActorMesh(
        RuleReward,
        2,
        args=(RewardConfig(num_workers=1),),
        kwargs={"tokenizer_path": model_path, "max_response_length": 8},
        resources={"CPU": 0.5},
        name="rule_reward",
    )
    try:
        answers = [str(i) for i in range(7)]
        responses = [[*encode(answer), TOKENIZER.eos_token_id] for answer in answers]
        truths = [answer if i % 2 == 0 else "x" for i, answer in enumerate(answers)]
        batch = Batch.from_generations(
            [encode(f"{i}+0=") for i in range(7)],
            responses,
            pad_token_id=TOKENIZER.pad_token_id,
            non_tensors={"data_source": ["arithmetic"] * 7, "ground_truth": truths},
        )
        scored = mesh.score.shard(batch).result()
        assert len(scored) == 7
        assert scored["pred"] == answers
        assert scored["score"] == [1.0 if i % 2 == 0 else 0.0 for i in range(7)]
        assert scored["token_level_scores"].sum(dim=-1).tolist() == scored["score"]
    finally:
        mesh.shutdown()
