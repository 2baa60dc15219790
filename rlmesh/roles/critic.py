"""The critic: a value head on a causal-LM backbone, trained data-parallel with the clipped value loss (PPO + GAE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlmesh.algo import masked_mean, value_loss
from rlmesh.checkpoint import capture_rng, load_rank_state, restore_rng, save_rank_state
from rlmesh.config import CriticConfig
from rlmesh.data.batch import Batch
from rlmesh.engine.devices import resolve_dtype
from rlmesh.engine.distributed import init_distributed, seed_everything
from rlmesh.engine.forward import micro_batches, require_fields, response_values, response_width
from rlmesh.engine.model_io import load_value_model, read_hf_weights
from rlmesh.engine.train_engine import TrainEngine
from rlmesh.engine.update import MicroLoss, mean_over_ranks, run_mini_batches
from rlmesh.mesh import endpoint

SCORE_FIELDS = ["input_ids", "attention_mask", "position_ids", "response_mask"]
UPDATE_FIELDS = [*SCORE_FIELDS, "values", "returns"]


class Critic:
    """V(s) for PPO with GAE on one data-parallel rank.

    The model is AutoModelForTokenClassification(num_labels=1) loaded from config.model.path, as verl does: the
    policy checkpoint's backbone plus a new linear head `score` (initialised from `seed`, the same on every rank).
    The value of response token t is the head's output at the position before it (the one whose logits score
    token t in the policy), so values[:, t] = V(prompt, response[:t]).
    """

    def __init__(self, config: CriticConfig, *, rollout_n: int, total_training_steps: int, seed: int, device: str):
        self.config = config
        self.rank, self.world_size = init_distributed(device)
        samples_per_mini_batch = config.ppo_mini_batch_size * rollout_n
        if samples_per_mini_batch % self.world_size:
            raise ValueError(
                f"critic.ppo_mini_batch_size={config.ppo_mini_batch_size} × rollout.n={rollout_n} samples do not "
                f"split over {self.world_size} data-parallel ranks; make it a multiple of critic.dp_size"
            )
        self.local_mini_batch_size = samples_per_mini_batch // self.world_size
        seed_everything(seed)  # the value head is new: every rank must initialise it alike
        model = load_value_model(config.model, device, dtype=torch.float32)
        total_optimizer_steps = config.optim.total_training_steps
        self.engine = TrainEngine(
            model,
            strategy=config.strategy,
            optim=config.optim,
            total_steps=total_optimizer_steps if total_optimizer_steps > 0 else total_training_steps,
            device=device,
            dtype=resolve_dtype(config.model.dtype, device=device),
            world_size=self.world_size,
            config_key="critic",
        )
        seed_everything(seed + self.rank)
        self.updates = 0

    @endpoint
    def compute_values(self, batch: Batch) -> Batch:
        """`values` [B, T] float32 for the rows of `batch`, 0 on padding (verl: only action tokens have values)."""
        require_fields(batch, SCORE_FIELDS, "Critic.compute_values")
        engine = self.engine
        engine.model.eval()
        token_budget = self.config.ppo_max_token_len_per_device if self.config.use_dynamic_bsz else None
        parts = micro_batches(
            batch.select(SCORE_FIELDS),
            self.config.ppo_micro_batch_size_per_device,
            token_budget,
            same_count_on_all_ranks=engine.strategy == "fsdp2",
        )
        results = []
        for part in parts:
            part = part.to(engine.device)
            with torch.no_grad(), engine.autocast():
                values = response_values(engine.model, part)
            results.append(Batch({"values": torch.where(part["response_mask"] != 0, values, 0.0)}))
        return parts.gather(results).to("cpu")

    @endpoint(collect=mean_over_ranks)
    def update(self, batch: Batch) -> dict[str, float]:
        """Clipped value regression towards `returns` around the old `values`, in the trainer's mini/micro-batch
        scheme. Metrics: critic/vf_loss (global mini-batch loss, mean over mini-batches), critic/vf_clipfrac and
        critic/vpred_mean (over all valid tokens), critic/grad_norm, critic/lr."""
        require_fields(batch, UPDATE_FIELDS, "Critic.update")
        config = self.config
        metrics = run_mini_batches(
            self.engine,
            batch.select(UPDATE_FIELDS),
            mini_batch_size=self.local_mini_batch_size,
            micro_batch_size=config.ppo_micro_batch_size_per_device,
            token_budget=config.ppo_max_token_len_per_device if config.use_dynamic_bsz else None,
            epochs=config.ppo_epochs,
            shuffle_generator=None,
            loss_agg_mode=config.loss_agg_mode,
            micro_loss=self._micro_loss,
            prefix="critic",
        )
        self.updates += 1
        return metrics

    def _micro_loss(self, micro: Batch, denominator: float) -> MicroLoss:
        mask = micro["response_mask"]
        predicted = response_values(self.engine.module, micro)
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

    @endpoint
    def save_checkpoint(self, path: str) -> None:
        """Rank 0 writes `path/critic/model` (HF layout: AutoModelForTokenClassification loads it); every rank
        writes `path/critic/state/rank{r}.pt` (optimizer, LR scheduler, RNG states, update count)."""
        weights = self.engine.full_state_dict(self.rank)
        if weights is not None:
            folder = Path(path) / "critic" / "model"
            self.engine.model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
        save_rank_state(Path(path) / "critic" / "state", self.rank, self._state())

    @endpoint
    def load_checkpoint(self, path: str) -> None:
        """Restore what save_checkpoint wrote."""
        state = load_rank_state(Path(path) / "critic" / "state", self.rank, self.world_size)
        self.engine.load_full_weights(read_hf_weights(Path(path) / "critic" / "model"))
        self.engine.load_state_dict(state["engine"])
        restore_rng(state["rng"])
        self.updates = state["updates"]

    def _state(self) -> dict[str, Any]:
        return {
            "engine": self.engine.state_dict(),
            "rng": capture_rng(),
            "updates": self.updates,
            "world_size": self.world_size,
        }
