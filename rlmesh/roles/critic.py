"""The critic: a value head on a causal-LM backbone, trained data-parallel with the clipped value loss (PPO + GAE)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from rlmesh.algo import masked_mean, value_loss
from rlmesh.config import CriticConfig
from rlmesh.data.batch import Batch
from rlmesh.engine.forward import SCORE_FIELDS, require_fields, response_values, response_width
from rlmesh.engine.model_io import load_value_model
from rlmesh.engine.update import MicroLoss, mean_over_ranks
from rlmesh.mesh import endpoint
from rlmesh.roles.learner import Learner

UPDATE_FIELDS = [*SCORE_FIELDS, "values", "returns"]


class Critic(Learner[CriticConfig]):
    """V(s) for PPO with GAE on one data-parallel rank.

    The model is AutoModelForTokenClassification(num_labels=1) loaded from config.model.path, as verl does: the
    policy checkpoint's backbone plus a new linear head `score` (initialised from `seed`, the same on every rank).
    The value of response token t is the head's output at the position before it (the one whose logits score
    token t in the policy), so values[:, t] = V(prompt, response[:t]).

    Checkpoints (Learner's save_checkpoint / load_checkpoint): `path/critic/model` in HF layout, which
    AutoModelForTokenClassification loads, and `path/critic/state/rank{r}.pt`.
    """

    config_key = "critic"
    weights_folder = "critic/model"
    state_folder = "critic/state"

    def _load_model(self, device: str) -> PreTrainedModel:
        return load_value_model(self.config.model, device, dtype=torch.float32)

    @endpoint
    def compute_values(self, batch: Batch) -> Batch:
        """`values` [B, T] float32 for the rows of `batch`, 0 on padding (verl: only action tokens have values)."""
        require_fields(batch, SCORE_FIELDS, "Critic.compute_values")

        def score(part: Batch) -> Batch:
            values = response_values(self.engine.model, part, packed=self.config.model.use_remove_padding)
            return Batch({"values": torch.where(part["response_mask"] != 0, values, 0.0)})

        return self._score(batch, score)

    @endpoint(collect=mean_over_ranks)
    def update(self, batch: Batch) -> dict[str, float]:
        """Clipped value regression towards `returns` around the old `values`, in the trainer's mini/micro-batch
        scheme. Metrics: critic/vf_loss (global mini-batch loss, mean over mini-batches), critic/vf_clipfrac and
        critic/vpred_mean (over all valid tokens), critic/grad_norm, critic/lr."""
        require_fields(batch, UPDATE_FIELDS, "Critic.update")
        return self._train(batch, UPDATE_FIELDS, shuffle_generator=None, prefix="critic")

    def _micro_loss(self, micro: Batch, denominator: float) -> MicroLoss:
        mask = micro["response_mask"]
        predicted = response_values(self.engine.module, micro, packed=self.config.model.use_remove_padding)
        loss, loss_metrics = value_loss(
            predicted,
            micro["values"],
            micro["returns"],
            mask,
            self.config.cliprange_value,
            self.config.loss_agg_mode,
            float(response_width(micro)),  # seq-mean-token-sum-norm: the padded response width
            denominator=denominator,
        )
        token_means = {**loss_metrics, "vpred_mean": masked_mean(predicted.detach(), mask)}
        return MicroLoss(loss, {"vf_loss": loss}, token_means)
