"""The train engine: a model wrapped for data parallelism (DDP or FSDP2) with its optimizer and LR schedule."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import PreTrainedModel, get_constant_schedule_with_warmup, get_wsd_schedule

from rlmesh.config import OptimConfig
from rlmesh.engine.devices import resolve_device
from rlmesh.engine.model_io import tied_aliases
from rlmesh.sync.manifest import hf_name

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp2")
LR_SCHEDULERS = ("constant", "cosine", "linear")


def build_optimizer(params: Iterator[nn.Parameter] | list[nn.Parameter], optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the config's lr, betas, eps and weight decay."""
    if len(optim.betas) != 2:
        raise ValueError(f"optim.betas needs two numbers (beta1, beta2), got {list(optim.betas)}")
    return torch.optim.AdamW(
        params, lr=optim.lr, betas=(optim.betas[0], optim.betas[1]), eps=optim.eps, weight_decay=optim.weight_decay
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over optim.lr_warmup_steps, then constant, or cosine / linear decay to min_lr_ratio × lr at
    `total_steps` and constant after it (transformers' schedules; one scheduler step per optimizer step)."""
    warmup = optim.lr_warmup_steps
    if warmup < 0:
        raise ValueError(f"optim.lr_warmup_steps must be >= 0, got {warmup}")
    if optim.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    if optim.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"optim.lr_scheduler={optim.lr_scheduler!r} is unknown; use one of {list(LR_SCHEDULERS)}")
    if total_steps <= warmup:
        raise ValueError(
            f"optim.lr_scheduler={optim.lr_scheduler} decays over the optimizer steps after warmup, but the total is "
            f"{total_steps} with lr_warmup_steps={warmup}; set optim.total_training_steps (optimizer steps) or pass "
            "the run's total"
        )
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio}")
    # Warmup-stable-decay with no stable phase is exactly warmup + decay, and holds min_lr_ratio after the end
    # (transformers' plain cosine schedule would climb back up past num_training_steps).
    return get_wsd_schedule(
        optimizer,
        num_warmup_steps=warmup,
        num_stable_steps=0,
        num_decay_steps=total_steps - warmup,
        decay_type=optim.lr_scheduler,
        min_lr_ratio=optim.min_lr_ratio,
    )


class TrainEngine:
    """A model trained data-parallel over the mesh: its wrapper, AdamW, LR schedule, mixed precision, gradient
    accumulation, clipping, full-weight gathering and checkpointable state.

    - World size 1: the bare model. Otherwise `ddp` (DistributedDataParallel) or `fsdp2` (`fully_shard` on each
      transformer block, then on the root). Both average gradients over ranks, which the loss scaling relies on.
    - Parameters and optimizer state stay float32 whatever the compute dtype: AdamW steps of lr 1e-6 on bfloat16
      weights (8 mantissa bits) mostly round to nothing. Forwards run in the compute dtype via autocast (and FSDP2
      also gathers parameters in it).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        strategy: str,
        optim: OptimConfig,
        total_steps: int,
        device: str,
        dtype: torch.dtype,
        world_size: int,
        config_key: str,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"{config_key}.strategy={strategy!r} is unknown; use one of {list(STRATEGIES)}")
        if dtype == torch.float16:
            raise ValueError(
                f"{config_key}.model.dtype=float16 needs loss scaling, which rlmesh does not do; use bfloat16"
            )
        self.model = model
        self.device = resolve_device(device)
        self.dtype = dtype
        self.world_size = world_size
        self.strategy = strategy if world_size > 1 else "none"
        self.aliases = tied_aliases(model)
        self.module: nn.Module = model
        if self.strategy == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers (rotary frequencies) are computed the same on every rank; syncing them before each forward
            # would only cost time (they are still synced once, at construction).
            self.module = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
        elif self.strategy == "fsdp2":
            _fully_shard(model, dtype, self.device)
        self.optimizer = build_optimizer(list(model.parameters()), optim)
        self.scheduler = build_scheduler(self.optimizer, optim, total_steps)
        self.grad_clip = optim.grad_clip

    # ------------------------------------------------------------------ forward and backward

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for forwards when the compute dtype is lower than the float32 parameters."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager[Any]:
        """Within it, backward passes sync gradients over ranks only if `enabled` (the last micro-batch of an
        accumulation); the others accumulate locally, which is what makes accumulation cheap."""
        if self.strategy == "ddp" and not enabled:
            assert isinstance(self.module, nn.parallel.DistributedDataParallel)
            return self.module.no_sync()
        if self.strategy == "fsdp2":
            self.model.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        return contextlib.nullcontext()

    def step(self) -> tuple[float, float]:
        """Clip the gradients, take one optimizer step and one scheduler step; returns (grad norm, lr used).

        A non-finite norm skips the optimizer step (as verl does), so one bad batch cannot destroy the weights;
        the norm is reported, and every rank sees the same norm so all ranks skip together.
        """
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf  # grad_clip <= 0: measure, do not clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the global norm as a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        lr = float(self.scheduler.get_last_lr()[0])
        norm = float(grad_norm)
        if math.isfinite(norm):
            self.optimizer.step()
        else:
            log.warning("gradient norm is %s: skipping this optimizer step", norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, lr

    # ------------------------------------------------------------------ weights

    def iter_full_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
        """(Hugging Face name, full tensor) for every weight a HF checkpoint stores, on this device, in `dtype`
        (default: the parameters' own). With FSDP2 each tensor is all-gathered: every rank must run the iterator
        to the end, in lockstep. Tensors may alias live parameters: read them before the next update."""
        for name, tensor in self._hf_weights():
            tensor = tensor.detach()
            if dtype is not None:
                tensor = tensor.to(dtype)  # on a DTensor this casts the local shard first: half the gather
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            yield name, tensor

    def full_weight_specs(self, dtype: torch.dtype | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
        """(HF name, dtype, full shape) of what iter_full_weights yields, in its order, from metadata only: a DTensor
        reports its global shape, so no rank gathers anything."""
        return [
            (name, str(dtype or tensor.dtype).removeprefix("torch."), tuple(int(d) for d in tensor.shape))
            for name, tensor in self._hf_weights()
        ]

    def _hf_weights(self) -> Iterator[tuple[str, Tensor]]:
        """(Hugging Face name, state-dict entry) for every weight a checkpoint stores: tied aliases left out."""
        for name, tensor in self.model.state_dict().items():
            name = hf_name(name)
            if name not in self.aliases:
                yield name, tensor

    def full_state_dict(self, rank: int) -> dict[str, Tensor] | None:
        """The full float32 weights on CPU, HF names: a dict on rank 0, None elsewhere (all ranks must call)."""
        if self.strategy != "fsdp2" and rank != 0:
            return None  # nothing to gather: rank 0 holds every weight itself
        weights: dict[str, Tensor] = {}
        for name, tensor in self.iter_full_weights():
            if rank == 0:
                weights[name] = tensor.to("cpu", copy=True)
        return weights if rank == 0 else None

    def load_full_weights(self, weights: dict[str, Tensor]) -> None:
        """Load full HF-named weights (every rank passes the same dict); tied aliases are filled in."""
        full = dict(weights)
        for alias, source in self.aliases.items():
            full.setdefault(alias, full[source])
        if self.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            options = StateDictOptions(full_state_dict=True, strict=True)
            set_model_state_dict(self.model, cast(dict[str, Any], full), options=options)
        else:
            self.model.load_state_dict(full, strict=True)

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and scheduler state of this rank; FSDP2's sharded states are saved as their local shards."""
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {
            index: {key: _local(value) for key, value in state.items()} for index, state in optimizer["state"].items()
        }
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        optimizer = state["optimizer"]
        if self.strategy == "fsdp2":
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            optimizer["state"] = {
                index: {key: _like_param(value, params[index]) for key, value in param_state.items()}
                for index, param_state in optimizer["state"].items()
            }
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])


def _fully_shard(model: PreTrainedModel, dtype: torch.dtype, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    precision = MixedPrecisionPolicy() if dtype == torch.float32 else MixedPrecisionPolicy(dtype, torch.float32)
    # One FSDP unit per transformer block (the classes HF marks as not to be split), then the root for the rest
    # (embeddings, final norm, head): each block's parameters are gathered only while it runs.
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in block_classes]
    if not blocks:
        raise ValueError(
            f"strategy fsdp2 found no transformer blocks in {type(model).__name__} (_no_split_modules="
            f"{sorted(block_classes)}); use strategy ddp for this model"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)


def _local(value: Any) -> Any:
    return value.to_local() if hasattr(value, "to_local") else value


def _like_param(value: Any, param: Tensor) -> Any:
    """A saved local optimizer-state shard turned back into a DTensor laid out like its (sharded) parameter."""
    from torch.distributed.tensor import DTensor

    if not isinstance(value, Tensor) or not isinstance(param, DTensor) or value.shape != param.to_local().shape:
        return value  # the step counter, a scalar
    return DTensor.from_local(
        value.to(param.device), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )
