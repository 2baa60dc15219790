"""The reference policy: a frozen copy of the initial policy that scores responses for the KL term."""

from __future__ import annotations

import torch

from rlmesh.config import ModelConfig, ReferenceConfig
from rlmesh.data.batch import Batch
from rlmesh.engine.devices import resolve_device
from rlmesh.engine.forward import SCORE_FIELDS, micro_batches, require_fields, response_logprobs
from rlmesh.engine.model_io import load_causal_lm
from rlmesh.mesh import endpoint


class Reference:
    """The initial policy at model.path, frozen, in the compute dtype (bfloat16 on GPU by default: it is never
    trained, so it needs no float32 master weights). Each actor scores its shard alone; no process group."""

    def __init__(self, config: ReferenceConfig, model: ModelConfig, *, device: str):
        self.config = config
        self.device = resolve_device(device)
        self.model = load_causal_lm(model, device).eval()
        self.model.requires_grad_(False)
        self.packed = model.use_remove_padding

    @endpoint
    def compute_ref_logprobs(self, batch: Batch) -> Batch:
        """`ref_logprobs` [B, T] float32 (0 on padding), at batch.meta["temperature"] as the policy's."""
        require_fields(batch, SCORE_FIELDS, "Reference.compute_ref_logprobs")
        temperature = float(batch.meta.get("temperature", 1.0))
        parts = micro_batches(batch.select(SCORE_FIELDS), self.config.log_prob_micro_batch_size_per_device)
        results = []
        for part in parts:
            part = part.to(self.device)
            with torch.no_grad():
                logprobs, _ = response_logprobs(self.model, part, temperature, packed=self.packed)
            results.append(Batch({"ref_logprobs": torch.where(part["response_mask"] != 0, logprobs, 0.0)}))
        return parts.gather(results).to("cpu")
