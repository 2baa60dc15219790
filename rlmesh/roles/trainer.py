"""The policy trainer: a causal LM trained data-parallel with PPO-style updates, scoring, weight export, checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from rlmesh.algo import get_policy_loss, policy_objective, rollout_correction
from rlmesh.config import ActorConfig
from rlmesh.data.batch import Batch
from rlmesh.engine.forward import SCORE_FIELDS, require_fields, response_logprobs
from rlmesh.engine.model_io import load_causal_lm, load_tokenizer
from rlmesh.engine.update import MicroLoss, mean_over_ranks
from rlmesh.mesh import endpoint
from rlmesh.roles.learner import Learner
from rlmesh.sync.manifest import SyncPlan
from rlmesh.sync.sender import member_group, send_weights

UPDATE_FIELDS = [*SCORE_FIELDS, "old_logprobs", "advantages"]
CORRECTION_PREFIX = "rollout_corr/"


class PolicyTrainer(Learner[ActorConfig]):
    """The policy (verl's actor) on one data-parallel rank; the loop drives it through an ActorMesh:

    trainer.compute_logprobs.shard(batch)   old log-probs and entropy, no grad
    trainer.update.shard(batch)             ppo_epochs × mini-batches, one optimizer step each
    trainer.export_weights.all()            full HF-named weights on rank 0 (FSDP2 gathers on every rank)
    trainer.save_checkpoint.all(path)       HF policy folder + per-rank optimizer / scheduler / RNG state

    Plays the CollectivePolicyLearner contract (rlmesh.roles.contracts).
    """

    # export_weights for the object store; weight_specs and push_weights for bucketed collective syncs
    weight_transports = ("object_store", "gloo", "nccl", "cuda_ipc")

    config_key = "trainer"
    weights_folder = "policy"
    state_folder = "policy_state"

    def __init__(self, config: ActorConfig, *, rollout_n: int, total_training_steps: int, seed: int, device: str):
        self.policy_loss = get_policy_loss(config.policy_loss)  # an unknown name fails before any model loads
        super().__init__(
            config, rollout_n=rollout_n, total_training_steps=total_training_steps, seed=seed, device=device
        )
        self.tokenizer = load_tokenizer(config.model)
        self.shuffle_generator = torch.Generator().manual_seed(seed + self.rank)

    def _load_model(self, device: str) -> PreTrainedModel:
        return load_causal_lm(self.config.model, device, dtype=torch.float32)

    # ------------------------------------------------------------------------------------------ scoring

    @endpoint
    def compute_logprobs(self, batch: Batch) -> Batch:
        """`old_logprobs` and `entropy` [B, T] float32 (0 on padding) for the rows of `batch`, nothing else.

        Scored at batch.meta["temperature"] (default 1.0), the temperature the rollout sampled at.
        """
        require_fields(batch, SCORE_FIELDS, "PolicyTrainer.compute_logprobs")
        temperature = float(batch.meta.get("temperature", 1.0))

        def score(part: Batch) -> Batch:
            logprobs, entropy = response_logprobs(
                self.engine.model, part, temperature, with_entropy=True, packed=self.config.model.use_remove_padding
            )
            assert entropy is not None
            valid = part["response_mask"] != 0
            return Batch(
                {"old_logprobs": torch.where(valid, logprobs, 0.0), "entropy": torch.where(valid, entropy, 0.0)}
            )

        return self._score(batch, score)

    # ------------------------------------------------------------------------------------------ training

    @endpoint(collect=mean_over_ranks)
    def update(self, batch: Batch) -> dict[str, float]:
        """PPO on this rank's shard: ppo_epochs passes of mini-batches (ppo_mini_batch_size × rollout_n samples
        over all ranks), gradients accumulated over micro-batches, one clipped optimizer step per mini-batch.

        Returns verl's metrics, identical on every rank: actor/pg_loss and actor/kl_loss (mean over mini-batches
        of the global mini-batch loss), actor/pg_clipfrac, actor/pg_clipfrac_lower, actor/ppo_kl, actor/entropy
        (means over all valid tokens), actor/grad_norm and actor/lr (means over the optimizer steps).

        The rollout correction: `rollout_is_weights` weigh each token's policy loss (decoupled mode). In bypass mode
        (meta["rollout_correction"]: the old log-probs are the rollout's) each micro-batch rejects by the current
        policy's ratio to them, and rollout_corr/ reports token-weighted means over the micro-batches (no max/min).
        """
        fields = [*UPDATE_FIELDS, "ref_logprobs"] if self.config.use_kl_loss else list(UPDATE_FIELDS)
        if "rollout_is_weights" in batch:
            fields.append("rollout_is_weights")
        require_fields(batch, fields, "PolicyTrainer.update")
        shuffle = self.shuffle_generator if self.config.shuffle else None
        metrics = self._train(batch, fields, shuffle_generator=shuffle, prefix="actor")
        return {key.removeprefix("actor/") if CORRECTION_PREFIX in key else key: v for key, v in metrics.items()}

    def _micro_loss(self, micro: Batch, denominator: float) -> MicroLoss:
        """The policy objective (rlmesh.algo.policy_objective) of one micro-batch with the mini-batch's
        `denominator`, so that the micro-batch losses add up to the mini-batch loss."""
        config = self.config
        temperature = float(micro.meta.get("temperature", 1.0))
        log_prob, entropy = response_logprobs(
            self.engine.module, micro, temperature, with_entropy=True, packed=config.model.use_remove_padding
        )
        mask = micro["response_mask"]
        correction_means: dict[str, Tensor] = {}
        bypass_correction = micro.meta.get("rollout_correction")
        if bypass_correction is not None:  # old_logprobs are the rollout's: correct by pi_theta / pi_rollout
            corrected = rollout_correction(log_prob, micro["old_logprobs"], mask, **bypass_correction)
            mask = corrected.keep.to(mask.dtype)
            correction_means = {  # left on the device: the update reads every token mean in one copy
                key: value.double()
                for key, value in corrected.metric_tensors.items()
                if not key.endswith(("_max", "_min"))  # a mean of micro-batch extremes is no extreme
            }
        objective = policy_objective(
            log_prob,
            micro["old_logprobs"],
            micro["advantages"],
            mask,
            entropy=entropy,
            ref_log_prob=micro["ref_logprobs"] if config.use_kl_loss else None,
            token_weights=micro.get("rollout_is_weights"),
            policy_loss=self.policy_loss,
            loss_agg_mode=config.loss_agg_mode,
            clip_ratio=config.clip_ratio,
            clip_ratio_low=config.clip_ratio_low,
            clip_ratio_high=config.clip_ratio_high,
            clip_ratio_c=config.clip_ratio_c,
            entropy_coeff=config.entropy_coeff,
            kl_loss_coef=config.kl_loss_coef,
            kl_loss_type=config.kl_loss_type,
            norm_constant=config.loss_norm_constant,  # None: the padded response width, the longest response
            denominator=denominator,
        )
        return MicroLoss(objective.loss, objective.loss_terms, objective.token_means | correction_means)

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
    # save_checkpoint and load_checkpoint are Learner's: `path/policy` (safetensors, config and tokenizer, loadable
    # by transformers and vLLM) and `path/policy_state/rank{r}.pt` (optimizer, scheduler, RNGs, shuffle, updates).

    def _save_beside_weights(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "shuffle": self.shuffle_generator.get_state()}

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        self.shuffle_generator.set_state(state["shuffle"])
