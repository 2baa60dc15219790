"""HFRollout.load_weights and compute_logprobs_of: weights land (or nothing does), versions stamp the samples."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlmesh.config import ModelConfig, RolloutConfig, SamplingConfig
from rlmesh.models.tiny import build_char_tokenizer
from rlmesh.roles.rollout.hf import HFRollout

PROMPT = list(build_char_tokenizer().encode("23+45=", add_special_tokens=False))
GREEDY = SamplingConfig(temperature=0.0, max_tokens=8)


def make_rollout(path: str) -> HFRollout:
    return HFRollout(RolloutConfig(sampling=SamplingConfig(max_tokens=8)), ModelConfig(path=path), seed=0, device="cpu")


def perturbed_weights(path: str, scale: float = 0.5) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """Every weight of the model at `path` plus seeded noise, and a model holding exactly those weights."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}, model


def manual_logprobs(model: torch.nn.Module, prompt: list[int], response: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    steps = logits[len(prompt) - 1 : -1].log_softmax(-1)
    return steps.gather(-1, torch.tensor(response)[:, None]).squeeze(-1).tolist()


def test_load_weights_changes_outputs_and_stamps_the_version(tiny_model_path: str) -> None:
    rollout = make_rollout(tiny_model_path)
    assert asyncio.run(rollout.weight_version()) == 0
    before = asyncio.run(rollout.generate(PROMPT, 1, GREEDY))[0]
    assert before.weight_version == 0
    weights, reference = perturbed_weights(tiny_model_path)

    asyncio.run(rollout.load_weights(weights, 3))

    assert asyncio.run(rollout.weight_version()) == 3
    after = asyncio.run(rollout.generate(PROMPT, 1, GREEDY))[0]
    assert after.weight_version == 3
    assert (after.response_ids, after.logprobs) != (before.response_ids, before.logprobs)
    assert after.logprobs == pytest.approx(manual_logprobs(reference, PROMPT, after.response_ids), abs=1e-5)
    served = asyncio.run(rollout.compute_logprobs_of(PROMPT, before.response_ids))
    assert served == pytest.approx(manual_logprobs(reference, PROMPT, before.response_ids), abs=1e-5)


def test_load_weights_takes_a_subset_and_converts_dtypes(tiny_model_path: str) -> None:
    rollout = make_rollout(tiny_model_path)
    before = asyncio.run(rollout.compute_logprobs_of(PROMPT, [5, 6, 7]))
    name = "model.layers.0.mlp.down_proj.weight"
    tensor = torch.zeros_like(rollout.model.state_dict()[name], dtype=torch.bfloat16)
    asyncio.run(rollout.load_weights({name: tensor}, 1))
    assert torch.count_nonzero(rollout.model.state_dict()[name]) == 0
    assert asyncio.run(rollout.compute_logprobs_of(PROMPT, [5, 6, 7])) != pytest.approx(before, abs=1e-6)


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda w: {**w, "model.layers.9.mlp.up_proj.weight": w["lm_head.weight"]}, "not weights of this model"),
        (lambda w: {f"module.{name}": tensor for name, tensor in w.items()}, "strip the prefix 'module.'"),
        (lambda w: {**w, "lm_head.weight": w["lm_head.weight"][:-1]}, "wrong shape.*lm_head.weight"),
        (lambda w: {}, "no tensors"),
    ],
    ids=["unknown-name", "wrapper-prefix", "wrong-shape", "empty"],
)
def test_load_weights_rejects_bad_names_and_shapes_and_loads_nothing(
    tiny_model_path: str, mangle: object, match: str
) -> None:
    rollout = make_rollout(tiny_model_path)
    before = asyncio.run(rollout.compute_logprobs_of(PROMPT, [5, 6, 7]))
    weights, _ = perturbed_weights(tiny_model_path)
    with pytest.raises(ValueError, match=match):
        asyncio.run(rollout.load_weights(mangle(weights), 7))  # type: ignore[operator]
    assert asyncio.run(rollout.weight_version()) == 0
    assert asyncio.run(rollout.compute_logprobs_of(PROMPT, [5, 6, 7])) == before


def test_compute_logprobs_of_matches_temperature_one_rollout_logprobs(tiny_model_path: str) -> None:
    rollout = make_rollout(tiny_model_path)
    samples = asyncio.run(rollout.generate(PROMPT, 4, SamplingConfig(temperature=1.0, max_tokens=8), seed=9))
    for sample in samples:
        recomputed = asyncio.run(rollout.compute_logprobs_of(sample.prompt_ids, sample.response_ids))
        assert recomputed == pytest.approx(sample.logprobs, abs=1e-5)
    assert asyncio.run(rollout.compute_logprobs_of(PROMPT, [])) == []
    with pytest.raises(ValueError, match="outside the vocabulary"):
        asyncio.run(rollout.compute_logprobs_of(PROMPT, [1000]))
