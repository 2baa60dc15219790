"""The base of the roles that train a model data-parallel (policy trainer, critic): set-up, updates, checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch
from transformers import PreTrainedModel

from rlmesh.checkpoint import capture_rng, load_rank_state, restore_rng, save_rank_state
from rlmesh.config import ModelConfig, OptimConfig
from rlmesh.data.batch import Batch
from rlmesh.engine.devices import resolve_dtype
from rlmesh.engine.distributed import init_distributed, seed_everything
from rlmesh.engine.forward import SCORE_FIELDS, micro_batches
from rlmesh.engine.model_io import read_hf_weights
from rlmesh.engine.train_engine import TrainEngine
from rlmesh.engine.update import MicroLoss, run_mini_batches
from rlmesh.mesh import endpoint


class LearnerConfig(Protocol):
    """The settings every learner reads (ActorConfig and CriticConfig both have them)."""

    model: ModelConfig
    optim: OptimConfig
    strategy: str
    ppo_mini_batch_size: int
    ppo_micro_batch_size_per_device: int
    use_dynamic_bsz: bool
    ppo_max_token_len_per_device: int
    ppo_epochs: int
    loss_agg_mode: str


ConfigT = TypeVar("ConfigT", bound=LearnerConfig)


class Learner(Generic[ConfigT]):
    """One data-parallel rank of a model trained with PPO-style mini-batch updates, and its checkpoints.

    A subclass names its config group (`config_key`, which error messages quote), the checkpoint sub-folders of
    its weights and of its per-rank state, loads its model (`_load_model`), and gives the loss of one micro-batch
    (`_micro_loss`). It keeps its own endpoints for scoring and updating; save_checkpoint and load_checkpoint are
    this class's.
    """

    config_key: ClassVar[str]
    weights_folder: ClassVar[str]  # in a checkpoint: the full weights, Hugging Face layout, written by rank 0
    state_folder: ClassVar[str]  # in a checkpoint: rank{r}.pt per rank (optimizer, scheduler, RNGs, update count)

    def __init__(self, config: ConfigT, *, rollout_n: int, total_training_steps: int, seed: int, device: str):
        self.config = config
        self.rank, self.world_size = init_distributed(device)
        samples_per_mini_batch = config.ppo_mini_batch_size * rollout_n
        if samples_per_mini_batch % self.world_size:
            raise ValueError(
                f"{self.config_key}.ppo_mini_batch_size={config.ppo_mini_batch_size} × rollout.n={rollout_n} samples "
                f"do not split over {self.world_size} data-parallel ranks; make it a multiple of "
                f"{self.config_key}.dp_size"
            )
        self.local_mini_batch_size = samples_per_mini_batch // self.world_size
        # The same seed on every rank while weights are created: FSDP2 keeps each rank's own shard of any freshly
        # initialised tensor (a critic's new value head), so all ranks must initialise alike. Per-rank streams after.
        seed_everything(seed)
        model = self._load_model(device)
        total_optimizer_steps = config.optim.total_training_steps
        self.engine = TrainEngine(
            model,
            strategy=config.strategy,
            optim=config.optim,
            total_steps=total_optimizer_steps if total_optimizer_steps > 0 else total_training_steps,
            device=device,
            dtype=resolve_dtype(config.model.dtype, device=device),
            world_size=self.world_size,
            config_key=self.config_key,
        )
        seed_everything(seed + self.rank)
        self.updates = 0

    def _load_model(self, device: str) -> PreTrainedModel:
        """The model to train, in float32 on `device` (the engine keeps float32 master weights)."""
        raise NotImplementedError

    def _micro_loss(self, micro: Batch, denominator: float) -> MicroLoss:
        """The loss of one micro-batch, aggregated with the mini-batch's `denominator` (run_mini_batches)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ scoring, training

    def _micro_batching(self) -> tuple[int, int | None]:
        """(rows per micro-batch, token budget per micro-batch or None), the same for scoring and for training."""
        config = self.config
        return config.ppo_micro_batch_size_per_device, (
            config.ppo_max_token_len_per_device if config.use_dynamic_bsz else None
        )

    def _score(self, batch: Batch, forward: Callable[[Batch], Batch]) -> Batch:
        """`forward` on each micro-batch of the batch's SCORE_FIELDS, in eval mode without grad, gathered in the
        batch's order, on CPU."""
        engine = self.engine
        engine.model.eval()
        parts = micro_batches(
            batch.select(SCORE_FIELDS), *self._micro_batching(), same_count_on_all_ranks=engine.strategy == "fsdp2"
        )
        results = []
        for part in parts:
            with torch.no_grad(), engine.autocast():
                results.append(forward(part.to(engine.device)))
        return parts.gather(results).to("cpu")

    def _train(
        self, batch: Batch, fields: list[str], *, shuffle_generator: torch.Generator | None, prefix: str
    ) -> dict[str, float]:
        """One update (ppo_epochs × mini-batches of micro-batches, run_mini_batches) on `fields` of this rank's
        shard; metrics under `prefix`."""
        config = self.config
        metrics = run_mini_batches(
            self.engine,
            batch.select(fields),
            mini_batch_size=self.local_mini_batch_size,
            micro_batch_size=config.ppo_micro_batch_size_per_device,
            token_budget=self._micro_batching()[1],
            epochs=config.ppo_epochs,
            shuffle_generator=shuffle_generator,
            loss_agg_mode=config.loss_agg_mode,
            micro_loss=self._micro_loss,
            prefix=prefix,
            num_mini_batches=int(batch.meta.get("prompts", 0)) // config.ppo_mini_batch_size or None,
        )
        self.updates += 1
        return metrics

    # ------------------------------------------------------------------------------------------ checkpoints

    @endpoint
    def save_checkpoint(self, path: str) -> None:
        """Rank 0 writes `path/<weights_folder>` (safetensors and config, loadable by transformers and vLLM);
        every rank writes `path/<state_folder>/rank{r}.pt` (optimizer, LR scheduler, RNG states, update count)."""
        weights = self.engine.full_state_dict(self.rank)
        if weights is not None:
            folder = Path(path) / self.weights_folder
            self.engine.model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
            self._save_beside_weights(folder)
        save_rank_state(Path(path) / self.state_folder, self.rank, self._state())

    @endpoint
    def load_checkpoint(self, path: str) -> None:
        """Restore what save_checkpoint wrote, so the next update is the one an uninterrupted run would make."""
        state = load_rank_state(Path(path) / self.state_folder, self.rank, self.world_size)
        self.engine.load_full_weights(read_hf_weights(Path(path) / self.weights_folder))
        self._load_state(state)

    def _save_beside_weights(self, folder: Path) -> None:
        """Anything else the weights folder must hold to be loadable on its own (the policy's tokenizer)."""

    def _state(self) -> dict[str, Any]:
        return {
            "engine": self.engine.state_dict(),
            "rng": capture_rng(),
            "updates": self.updates,
            "world_size": self.world_size,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        restore_rng(state["rng"])
        self.updates = state["updates"]
