"""A trainer stand-in, a tiny saved model and engine settings shared by the vLLM tests (CPU and GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlmesh.config import RolloutConfig
from rlmesh.mesh import endpoint
from rlmesh.sync.manifest import tensor_specs
from rlmesh.sync.sender import member_group, send_weights

PROMPT = [3, 4, 5, 6, 7]
RESPONSE = [8, 9, 10, 11, 12, 13, 14]


class TinySender:
    """Stands in for the trainer: a float32 HF model with the two endpoints CollectiveWeightSync calls."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(self.device).eval()

    def iter_full_weights(self) -> Any:
        return iter(self.model.state_dict().items())  # lm_head.weight included: the plan drops the tied copy

    @endpoint
    def weight_specs(self) -> list[Any]:
        return tensor_specs(self.iter_full_weights())

    @endpoint
    def push_weights(self, group_name: str, plan: Any, version: int) -> dict[str, float]:
        return send_weights(self.iter_full_weights(), plan, member_group(group_name), version=version)

    @endpoint
    def export_weights(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.iter_full_weights()}

    @endpoint
    def perturb(self, scale: float, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.model.parameters():
                param.add_((torch.randn(param.shape, generator=generator) * scale).to(self.device))

    @endpoint
    def logprobs_of(self, prompt: list[int], response: list[int], temperature: float = 1.0) -> list[float]:
        ids = torch.tensor([prompt + response], device=self.device)
        with torch.no_grad():
            logits = self.model(ids).logits[0, :-1].float() / temperature
        picked = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        return picked[len(prompt) - 1 :].tolist()

    @endpoint
    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt], device=self.device)
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
        return out[0, len(prompt) :].tolist()


def save_tiny_model(folder: Path) -> str:
    from rlmesh.models.tiny import build_char_tokenizer, build_tiny_qwen2
    from rlmesh.models.tiny import save_tiny_model as save

    tokenizer = build_char_tokenizer()
    save(build_tiny_qwen2(tokenizer, seed=0, num_hidden_layers=2), tokenizer, folder)
    return str(folder)


def rollout_config(**overrides: Any) -> RolloutConfig:
    # 64 MiB of KV cache is plenty for 128-token sequences and skips the CPU warm-up pass.
    settings: dict[str, Any] = {
        "dtype": "float32",
        "max_model_len": 128,
        "max_num_seqs": 64,
        "kv_cache_memory_gb": 0.0625,
    }
    return RolloutConfig(**{**settings, **overrides})


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))
