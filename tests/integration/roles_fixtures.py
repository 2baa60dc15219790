"""Tiny policy checkpoints, rollout-shaped batches and a digest-reporting trainer, shared by the role tests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from rlmesh.config import ActorConfig, CriticConfig, ModelConfig, OptimConfig
from rlmesh.data.batch import Batch
from rlmesh.mesh import endpoint
from rlmesh.models.tiny import build_char_tokenizer, build_tiny_qwen2, save_tiny_model
from rlmesh.roles.trainer import PolicyTrainer

# Small enough for 2 shared cores: about 60 k parameters, 2 blocks of 2 heads of 32.
TINY_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 32,
}
PAD_ID = 0  # the character tokenizer's <|pad|>
FIRST_TOKEN_ID = 3  # after pad, eos and unk


def save_tiny_policy(folder: Path, *, tie_word_embeddings: bool = True, seed: int = 0) -> str:
    """A freshly initialised tiny Qwen2 policy with its tokenizer, saved in Hugging Face layout; returns the path."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, seed=seed, tie_word_embeddings=tie_word_embeddings, **TINY_SIZES)
    return str(save_tiny_model(model, tokenizer, folder))


def vocab_size() -> int:
    return len(build_char_tokenizer())


def rollout_batch(num_samples: int, *, seed: int = 0, temperature: float = 1.0, empty_response: bool = True) -> Batch:
    """Random prompts (1-5 tokens, left-padded) and responses (1-6 tokens, right-padded; the last one empty when
    `empty_response`), with one advantage per sequence on its tokens, returns, and old values of 0."""
    generator = torch.Generator().manual_seed(seed)
    vocab = vocab_size()

    def random_ids(shortest: int, longest: int) -> list[int]:
        length = int(torch.randint(shortest, longest + 1, (), generator=generator))
        return torch.randint(FIRST_TOKEN_ID, vocab, (length,), generator=generator).tolist()

    prompts = [random_ids(1, 5) for _ in range(num_samples)]
    responses = [random_ids(1, 6) for _ in range(num_samples)]
    if empty_response:
        responses[-1] = []
    batch = Batch.from_generations(prompts, responses, pad_token_id=PAD_ID, meta={"temperature": temperature})
    mask = batch["response_mask"].float()
    batch["advantages"] = torch.randn(num_samples, 1, generator=generator) * mask
    batch["returns"] = torch.rand(num_samples, 1, generator=generator) * mask
    batch["values"] = torch.zeros_like(mask)
    return batch


def actor_config(path: str, **overrides: Any) -> ActorConfig:
    """A trainer config for the tiny model: float32 on CPU, 2 samples per micro-batch, no grad clipping surprises."""
    optim = overrides.pop("optim", OptimConfig(lr=1e-3, grad_clip=1.0))
    settings: dict[str, Any] = {"ppo_mini_batch_size": 2, "ppo_micro_batch_size_per_device": 2, **overrides}
    return ActorConfig(model=ModelConfig(path=path), optim=optim, **settings)


def critic_config(path: str, **overrides: Any) -> CriticConfig:
    optim = overrides.pop("optim", OptimConfig(lr=1e-3, grad_clip=1.0))
    settings: dict[str, Any] = {"ppo_mini_batch_size": 2, "ppo_micro_batch_size_per_device": 2, **overrides}
    return CriticConfig(model=ModelConfig(path=path), optim=optim, **settings)


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor's bytes, in name order: equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DigestTrainer(PolicyTrainer):
    """A PolicyTrainer that also reports a digest of the weights each rank holds (rank 1 included)."""

    @endpoint
    def weights_digest(self) -> str:
        return weights_digest(dict(self.iter_full_weights()))
