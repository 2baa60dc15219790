"""User-defined role classes, swapped in through `_target_` by the role-swap test (no rlmesh code changes)."""

from __future__ import annotations

from typing import Any

import torch

from rlmesh.data import Batch
from rlmesh.mesh import endpoint
from rlmesh.roles.rollout.base import Sample


class HalfReward:
    """Scores every response 0.5, whatever it says."""

    def __init__(self, config: Any, *, tokenizer_path: str, max_response_length: int) -> None:
        self.calls = 0

    @endpoint
    def score(self, batch: Batch) -> Batch:
        self.calls += 1
        mask = batch["response_mask"]
        scores = torch.zeros(mask.shape, dtype=torch.float32)
        last = (mask.sum(-1) - 1).clamp(min=0)
        scores[torch.arange(len(batch)), last] = 0.5
        out = Batch({"token_level_scores": scores}, size=len(batch))
        out["score"] = [0.5] * len(batch)
        return out


class PlainHFRollout:
    """A user's rollout: transformers' own `generate`, sampling n responses per prompt, nothing of rlmesh's but the
    @endpoint marks and the Sample it returns. Weights arrive as a state dict through the object store."""

    def __init__(self, config: Any, model: Any, *, seed: int, device: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
        self.eos = AutoTokenizer.from_pretrained(model.path).eos_token_id
        self.version = 0
        self.generated = 0

    @endpoint
    def generate(self, prompt_ids: list[int], n: int, sampling: Any = None, seed: int | None = None) -> list[Sample]:
        torch.manual_seed(seed or 0)
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                do_sample=True,
                temperature=float(sampling.temperature),
                top_k=0,
                top_p=1.0,
                max_new_tokens=int(sampling.max_tokens),
                num_return_sequences=n,
                pad_token_id=self.eos,
                output_scores=True,
                return_dict_in_generate=True,
            )
            logprobs = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        samples = []
        for tokens, token_logprobs in zip(out.sequences[:, len(prompt_ids) :].tolist(), logprobs.tolist(), strict=True):
            end = tokens.index(self.eos) + 1 if self.eos in tokens else len(tokens)
            samples.append(Sample(list(prompt_ids), tokens[:end], token_logprobs[:end], self.version))
        self.generated += len(samples)
        return samples

    @endpoint
    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(weights, strict=False)
        self.version = version

    @endpoint
    def weight_version(self) -> int:
        return self.version


class ScorerWithoutScore:
    """A scorer that forgot its endpoint: `score` is a plain method, so the mesh could not call it."""

    def __init__(self, config: Any, *, tokenizer_path: str, max_response_length: int) -> None:
        pass

    def score(self, batch: Batch) -> Batch:
        return batch
