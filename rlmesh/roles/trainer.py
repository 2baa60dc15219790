"""The policy trainer: a causal LM trained data-parallel with PPO-style updates, scoring, weight export, checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlmesh.algo import agg_loss, get_policy_loss, kl_penalty, masked_mean
from rlmesh.checkpoint import capture_rng, load_rank_state, restore_rng, save_rank_state
from rlmesh.config import ActorConfig
from rlmesh.data.batch import Batch
from rlmesh.engine.devices import resolve_dtype
from rlmesh.engine.distributed import init_distributed, seed_everything
from rlmesh.engine.forward import micro_batches, require_fields, response_logprobs, response_width
from rlmesh.engine.model_io import load_causal_lm, load_tokenizer, read_hf_weights
from rlmesh.engine.train_engine import TrainEngine
from rlmesh.engine.update import MicroLoss, mean_over_ranks, run_mini_batches
from rlmesh.mesh import endpoint
from rlmesh.sync.manifest import SyncPlan
from rlmesh.sync.sender import member_group, send_weights

SCORE_FIELDS = ["input_ids", "attention_mask", "position_ids", "response_mask"]
UPDATE_FIELDS = [*SCORE_FIELDS, "old_logprobs", "advantages"]


class PolicyTrainer:
    """The policy (verl's actor) on one data-parallel rank; the loop drives it through an ActorMesh:

    trainer.compute_logprobs.shard(batch)   old log-probs and entropy, no grad
    trainer.update.shard(batch)             ppo_epochs × mini-batches, one optimizer step each
    trainer.export_weights.all()            full HF-named weights on rank 0 (FSDP2 gathers on every rank)
    trainer.save_checkpoint.all(path)       HF policy folder + per-rank optimizer / scheduler / RNG state
    """

    def __init__(self, config: ActorConfig, *, rollout_n: int, total_training_steps: int, seed: int, device: str):
        self.config = config
        self.rank, self.world_size = init_distributed(device)
        samples_per_mini_batch = config.ppo_mini_batch_size * rollout_n
        if samples_per_mini_batch % self.world_size:
            raise ValueError(
                f"trainer.ppo_mini_batch_size={config.ppo_mini_batch_size} × rollout.n={rollout_n} samples do not "
                f"split over {self.world_size} data-parallel ranks; make it a multiple of trainer.dp_size"
            )
        self.local_mini_batch_size = samples_per_mini_batch // self.world_size
        self.policy_loss = get_policy_loss(config.policy_loss)
        # The same seed on every rank while weights are created: FSDP2 keeps each rank's own shard of any freshly
        # initialised tensor, so all ranks must initialise alike. Per-rank streams start after.
        seed_everything(seed)
        model = load_causal_lm(config.model, device, dtype=torch.float32)
        self.tokenizer = load_tokenizer(config.model)
        total_optimizer_steps = config.optim.total_training_steps
        self.engine = TrainEngine(
            model,
            strategy=config.strategy,
            optim=config.optim,
            total_steps=total_optimizer_steps if total_optimizer_steps > 0 else total_training_steps,
            device=device,
            dtype=resolve_dtype(config.model.dtype, device=device),
            world_size=self.world_size,
            config_key="trainer",
        )
        seed_everything(seed + self.rank)
        self.shuffle_generator = torch.Generator().manual_seed(seed + self.rank)
        self.updates = 0

    # ------------------------------------------------------------------------------------------ scoring

    @endpoint
    def compute_logprobs(self, batch: Batch) -> Batch:
        """`old_logprobs` and `entropy` [B, T] float32 (0 on padding) for the rows of `batch`, nothing else.

        Scored at batch.meta["temperature"] (default 1.0), the temperature the rollout sampled at.
        """
        require_fields(batch, SCORE_FIELDS, "PolicyTrainer.compute_logprobs")
        temperature = float(batch.meta.get("temperature", 1.0))
        engine = self.engine
        engine.model.eval()
        parts = micro_batches(
            batch.select(SCORE_FIELDS), *self._micro_batching(), same_count_on_all_ranks=engine.strategy == "fsdp2"
        )
        results = []
        for part in parts:
            part = part.to(engine.device)
            with torch.no_grad(), engine.autocast():
                logprobs, entropy = response_logprobs(engine.model, part, temperature, with_entropy=True)
            assert entropy is not None
            valid = part["response_mask"] != 0
            results.append(
                Batch({"old_logprobs": torch.where(valid, logprobs, 0.0), "entropy": torch.where(valid, entropy, 0.0)})
            )
        return parts.gather(results).to("cpu")

    # ------------------------------------------------------------------------------------------ training

    @endpoint(collect=mean_over_ranks)
    def update(self, batch: Batch) -> dict[str, float]:
        """PPO on this rank's shard: ppo_epochs passes of mini-batches (ppo_mini_batch_size × rollout_n samples
        over all ranks), gradients accumulated over micro-batches, one clipped optimizer step per mini-batch.

        Returns verl's metrics, identical on every rank: actor/pg_loss and actor/kl_loss (mean over mini-batches
        of the global mini-batch loss), actor/pg_clipfrac, actor/pg_clipfrac_lower, actor/ppo_kl, actor/entropy
        (means over all valid tokens), actor/grad_norm and actor/lr (means over the optimizer steps).
        """
        fields = [*UPDATE_FIELDS, "ref_logprobs"] if self.config.use_kl_loss else UPDATE_FIELDS
        require_fields(batch, fields, "PolicyTrainer.update")
        config = self.config
        metrics = run_mini_batches(
            self.engine,
            batch.select(fields),
            mini_batch_size=self.local_mini_batch_size,
            micro_batch_size=config.ppo_micro_batch_size_per_device,
            token_budget=self._micro_batching()[1],
            epochs=config.ppo_epochs,
            shuffle_generator=self.shuffle_generator if config.shuffle else None,
            loss_agg_mode=config.loss_agg_mode,
            micro_loss=self._micro_loss,
            prefix="actor",
        )
        self.updates += 1
        return metrics

    def _micro_batching(self) -> tuple[int, int | None]:
        config = self.config
        return config.ppo_micro_batch_size_per_device, (
            config.ppo_max_token_len_per_device if config.use_dynamic_bsz else None
        )

    def _micro_loss(self, micro: Batch, denominator: float) -> MicroLoss:
        """policy loss - entropy_coeff × entropy + kl_loss_coef × KL(pi || ref), each aggregated with the same
        loss_agg_mode and mini-batch `denominator`, so the micro-batch losses add up to the mini-batch loss."""
        config = self.config
        mask = micro["response_mask"]
        # Dr.GRPO's constant: the configured one, else the padded response width (the max response length).
        norm_constant = config.loss_norm_constant or float(response_width(micro))
        temperature = float(micro.meta.get("temperature", 1.0))
        log_prob, entropy = response_logprobs(self.engine.module, micro, temperature, with_entropy=True)
        assert entropy is not None
        pg_loss, pg_metrics = self.policy_loss(
            micro["old_logprobs"],
            log_prob,
            micro["advantages"],
            mask,
            loss_agg_mode=config.loss_agg_mode,
            clip_ratio=config.clip_ratio,
            clip_ratio_low=config.clip_ratio_low,
            clip_ratio_high=config.clip_ratio_high,
            clip_ratio_c=config.clip_ratio_c,
            norm_constant=norm_constant,
            denominator=denominator,
        )
        loss = pg_loss
        loss_terms = {"pg_loss": pg_loss}
        if config.entropy_coeff != 0:
            entropy_loss = agg_loss(entropy, mask, config.loss_agg_mode, norm_constant, denominator=denominator)
            loss = loss - config.entropy_coeff * entropy_loss
        if config.use_kl_loss:
            # rlmesh.algo.kl_loss without its own normaliser: the same masking, then agg_loss with the mini-batch's.
            valid = mask != 0
            per_token = kl_penalty(
                torch.where(valid, log_prob, 0.0),
                torch.where(valid, micro["ref_logprobs"], 0.0),
                config.kl_loss_type,
            )
            kl_term = agg_loss(per_token, mask, config.loss_agg_mode, norm_constant, denominator=denominator)
            loss = loss + config.kl_loss_coef * kl_term
            loss_terms["kl_loss"] = kl_term
        token_means = {**pg_metrics, "entropy": masked_mean(entropy.detach(), mask)}
        return MicroLoss(loss, loss_terms, token_means)

    # ------------------------------------------------------------------------------------------ weights

    def iter_full_weights(self) -> Iterator[tuple[str, Tensor]]:
        """(Hugging Face name, full tensor) for every weight a HF checkpoint of this model holds, in the compute
        dtype (bfloat16 on GPU by default), on this rank's device. Lazy: with FSDP2 each tensor is all-gathered
        when reached, so every rank must run the iterator to the end in the same order. Tensors may share memory
        with the live parameters: use them before the next update."""
        return self.engine.iter_full_weights(self.engine.dtype)

    @endpoint
    def export_weights(self) -> dict[str, Tensor] | None:
        """Rank 0: {hf_name: CPU tensor} in the compute dtype; other ranks None. Call on all ranks (`.all()`)."""
        if self.engine.strategy != "fsdp2" and self.rank != 0:
            return None  # nothing to gather: rank 0 holds the full weights itself
        weights = {name: tensor.to("cpu", copy=True) for name, tensor in self.iter_full_weights()}
        return weights if self.rank == 0 else None

    @endpoint
    def weight_specs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(HF name, dtype, shape) of every tensor push_weights sends, in order: the sync plan is built from it."""
        return self.engine.full_weight_specs(self.engine.dtype)

    @endpoint
    def push_weights(self, group_name: str, plan: SyncPlan, version: int) -> dict[str, float]:
        """One bucketed sync to the rollout engines: every rank iterates its full weights in lockstep (FSDP2 gathers
        are collective), rank 0 sends them over the weight-sync group."""
        return send_weights(self.iter_full_weights(), plan, member_group(group_name), version=version)

    # ------------------------------------------------------------------------------------------ checkpoints

    @endpoint
    def save_checkpoint(self, path: str) -> None:
        """Rank 0 writes `path/policy` (safetensors + config + tokenizer, loadable by transformers and vLLM);
        every rank writes `path/policy_state/rank{r}.pt` (optimizer, LR scheduler, RNG states, update count)."""
        weights = self.engine.full_state_dict(self.rank)
        if weights is not None:
            policy = Path(path) / "policy"
            self.engine.model.save_pretrained(policy, state_dict=weights, safe_serialization=True)
            self.tokenizer.save_pretrained(policy)
        save_rank_state(Path(path) / "policy_state", self.rank, self._state())

    @endpoint
    def load_checkpoint(self, path: str) -> None:
        """Restore what save_checkpoint wrote, so the next update is the one an uninterrupted run would make."""
        state = load_rank_state(Path(path) / "policy_state", self.rank, self.world_size)
        self.engine.load_full_weights(read_hf_weights(Path(path) / "policy"))
        self.engine.load_state_dict(state["engine"])
        restore_rng(state["rng"])
        self.shuffle_generator.set_state(state["shuffle"])
        self.updates = state["updates"]

    def _state(self) -> dict[str, Any]:
        return {
            "engine": self.engine.state_dict(),
            "rng": capture_rng(),
            "shuffle": self.shuffle_generator.get_state(),
            "updates": self.updates,
            "world_size": self.world_size,
        }
