"""Shared model plumbing for the trainer, critic and reference: loading, response forwards, micro-batches, training."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_constant_schedule_with_warmup,
    get_wsd_schedule,
)

from rlmesh.algo import entropy_from_logits_chunked, logprobs_from_logits
from rlmesh.config import ModelConfig, OptimConfig
from rlmesh.data.batch import Batch, BatchParts, balanced_partition
from rlmesh.mesh import current_rank
from rlmesh.sync.manifest import hf_name

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp2")
LR_SCHEDULERS = ("constant", "cosine", "linear")
# A collective that waits longer than this raises instead of hanging the run (torch's own default is 30 minutes).
DIST_TIMEOUT_S = 600
# Rows of [tokens, vocab] logits per chunk when computing entropy: 1024 × 152k (Qwen2.5) float32 is 0.6 GB.
ENTROPY_CHUNK_ROWS = 1024
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------ devices and ranks


def compute_dtype(name: str, device: str) -> torch.dtype:
    """The dtype forwards run in: `auto` is bfloat16 on CUDA and float32 on CPU; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={name!r} is not a known dtype; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def torch_device(device: str) -> torch.device:
    """The torch device for "cpu" or "cuda" (the one GPU Ray made visible to this actor)."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch sees no GPU here; give the mesh GPU resources or use cpu")
        return torch.device("cuda", torch.cuda.current_device())
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def dp_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of this actor in its mesh; (0, 1) outside a mesh, e.g. in a test or a notebook."""
    try:
        place = current_rank()
    except RuntimeError:
        return 0, 1
    return place.rank, place.world_size


def init_distributed(device: str) -> tuple[int, int]:
    """Join the mesh's torch.distributed default group (gloo on CPU, nccl on CUDA) when it has several actors.

    Rendezvous through RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, which an ActorMesh sets in every actor. Returns
    (rank, world size); with one actor no group is made and every collective below is skipped.
    """
    rank, world_size = dp_rank_and_size()
    if world_size == 1 or dist.is_initialized():
        return rank, world_size
    from rlmesh.mesh.collective import bind_host, host_store, interface_of

    timeout = timedelta(seconds=DIST_TIMEOUT_S)
    # The store on rank 0's node address only (torch's env:// store listens on every interface), and gloo's device
    # on this node's interface (by default gloo takes whatever the hostname resolves to).
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank == 0:
        store = host_store(host, port, world_size, timeout)
    else:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    interface = interface_of(bind_host())
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    options: dict[str, Any] = {"timeout": timeout, "store": store}
    if device == "cuda":
        options["device_id"] = torch_device(device)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size, **options)
    return rank, world_size


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    # NCCL reduces GPU tensors only; gloo reduces CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum over the data-parallel ranks, returned on the device `values` is on; a no-op without a process group."""
    if not _distributed():
        return values
    summed = values.to(_collective_device())
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(values.device)


def _all_reduce_max(value: int) -> int:
    if not _distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's `random` and numpy's global generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- loading


def _from_pretrained_options(model_config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "use_safetensors": True,  # never a pickled .bin: unpickling a downloaded file can run its code
        "dtype": dtype,
        "attn_implementation": model_config.attn_implementation,
        "trust_remote_code": model_config.trust_remote_code,
    }


def _prepare(model: PreTrainedModel, model_config: ModelConfig, device: str) -> PreTrainedModel:
    # The config is left as loaded (use_cache included): it is saved with every checkpoint that rollout engines
    # load. Our forwards pass use_cache=False themselves.
    if model_config.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP, FSDP2 and inputs that do not require grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    nn.Module.to(model, torch_device(device))  # in place; PreTrainedModel.to has a wrapper type mypy cannot call
    return model


def load_causal_lm(model_config: ModelConfig, device: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The Hugging Face causal LM at model_config.path on `device`, in `dtype` (default: compute_dtype)."""
    dtype = dtype or compute_dtype(model_config.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(model_config.path, **_from_pretrained_options(model_config, dtype))
    return _prepare(model, model_config, device)


def load_value_model(model_config: ModelConfig, device: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A value model: the LM backbone at model_config.path plus a 1-output linear head on every token.

    AutoModelForTokenClassification(num_labels=1), as verl's critic: the backbone loads from a causal-LM
    checkpoint, the head `score` is new (initialised from torch's current seed), and dropout on the head is
    turned off so that a value is a deterministic function of the tokens, in train mode too.
    """
    dtype = dtype or compute_dtype(model_config.dtype, device)
    config = AutoConfig.from_pretrained(model_config.path, trust_remote_code=model_config.trust_remote_code)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    model = AutoModelForTokenClassification.from_pretrained(
        model_config.path, config=config, **_from_pretrained_options(model_config, dtype)
    )
    return _prepare(model, model_config, device)


def load_tokenizer(model_config: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the model; a checkpoint carries it so vLLM and transformers can load it."""
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            model_config.path, trust_remote_code=model_config.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"no tokenizer could be loaded from model.path={model_config.path!r} ({err}); a policy checkpoint "
            "needs one: save the tokenizer into that folder (tokenizer.save_pretrained)"
        ) from err
    return tokenizer


def read_hf_weights(folder: str | Path) -> dict[str, Tensor]:
    """Every tensor of the *.safetensors files of a Hugging Face folder (one file or shards), on CPU."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {str(folder)!r}; is it a checkpoint folder?")
    weights: dict[str, Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: source} for state-dict entries that are the same tensor as an earlier entry (tied embeddings).

    Hugging Face checkpoints store only the source (e.g. model.embed_tokens.weight, not lm_head.weight).
    """
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        source = first_name.setdefault(id(tensor), name)
        if source != name:
            aliases[hf_name(name)] = hf_name(source)
    return aliases


# ------------------------------------------------------------------------------------------ response forward


def response_width(batch: Batch) -> int:
    """T, the width of the per-token response fields; the last T columns of input_ids are the response."""
    return int(batch["response_mask"].shape[1])


def _response_forward(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, int]:
    """The model's outputs at the positions that predict the response tokens, and those tokens.

    With P = prompt width and T = response width (prompt left-padded, response right-padded, verl's layout), the
    output at position P-1+t sees the prompt and response tokens < t and scores response token t. Columns that are
    padding in every row (the left of the prompt, the right of the response) are cut before the forward: positions
    come from position_ids and padding is masked, so the result is the same, for less work. Returns
    (outputs [B, R, ...], response token ids [B, R], R) where R <= T is the widest real response (at least 1).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    total_width, width = input_ids.shape[1], response_width(batch)
    prompt_width = total_width - width
    if prompt_width < 1:
        raise ValueError(
            f"input_ids has {total_width} columns and response_mask {width}: no prompt column is left to predict "
            "the first response token; input_ids must be prompt ++ response"
        )
    # The first column where some row has a real prompt token (argmax finds the first 1), and one past the last
    # column where some row has a real response token.
    start = int(attention_mask[:, :prompt_width].any(dim=0).to(torch.int8).argmax())
    used_response = attention_mask[:, prompt_width:].any(dim=0).nonzero()
    used_width = max(int(used_response.max()) + 1 if used_response.numel() else 0, 1)
    stop = prompt_width + used_width
    outputs = model(
        input_ids=input_ids[:, start:stop],
        attention_mask=attention_mask[:, start:stop],
        position_ids=batch["position_ids"][:, start:stop],
        use_cache=False,
    ).logits
    first = prompt_width - 1 - start
    return outputs[:, first : first + used_width], input_ids[:, prompt_width:stop], used_width


def _pad_to(values: Tensor, width: int) -> Tensor:
    # F.pad keeps the gradient; the padded columns hold 0.
    return nn.functional.pad(values, (0, width - values.shape[-1]))


def response_logprobs(
    model: nn.Module, batch: Batch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """log pi(response token t | prompt, tokens < t) [B, T] float32 and, if asked, the entropy there [B, T].

    Logits are divided by `temperature` first, as the rollout engine does when it samples, so these log-probs are
    comparable with the rollout's. Differentiable when grad is enabled. Needs input_ids, attention_mask,
    position_ids and response_mask; values at masked positions are not meaningful.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score tokens, got {temperature}; greedy batches score at 1.0")
    width = response_width(batch)
    logits, response_ids, _ = _response_forward(model, batch)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = _pad_to(logprobs_from_logits(logits, response_ids), width)
    if not with_entropy:
        return logprobs, None
    entropy = entropy_from_logits_chunked(logits, chunk_size=ENTROPY_CHUNK_ROWS)
    return logprobs, _pad_to(entropy, width)


def response_values(model: nn.Module, batch: Batch) -> Tensor:
    """A value model's V(state before response token t) [B, T] float32: its output at the same positions as the
    logits that score token t (verl's alignment: values[:, -T-1:-1])."""
    values, _, _ = _response_forward(model, batch)
    return _pad_to(values[..., 0].float(), response_width(batch))


def micro_batches(
    batch: Batch, size: int, token_budget: int | None = None, *, same_count_on_all_ranks: bool = False
) -> BatchParts:
    """Split a batch into micro-batches of at most `size` rows or, with `token_budget`, at most that many tokens.

    By tokens: the fewest parts whose token sums (attention_mask) fit the budget, rows balanced across parts by
    balanced_partition; each part keeps its rows in order and `parts.gather(results)` restores the batch's order.
    `same_count_on_all_ranks` takes the largest count over the data-parallel ranks (FSDP2 gathers parameters in
    every forward, so all ranks must run the same number); the budget is then a target the parts meet or beat.
    """
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1 sample, got {size}")
    if len(batch) == 0:
        raise ValueError("cannot split an empty batch into micro-batches")
    if token_budget is None:
        count = math.ceil(len(batch) / size)
        if same_count_on_all_ranks:
            count = min(_all_reduce_max(count), len(batch))
        return batch.split(count)
    lengths = batch.sequence_lengths().tolist()
    longest = max(lengths)
    if longest > token_budget:
        raise ValueError(
            f"a sequence of {longest} tokens does not fit the micro-batch token budget of {token_budget}; raise "
            f"ppo_max_token_len_per_device to at least {longest} (prompt + response length)"
        )
    count = max(1, math.ceil(sum(lengths) / token_budget))
    groups = balanced_partition(lengths, count)
    while max(sum(lengths[i] for i in group) for group in groups) > token_budget:
        count += 1
        groups = balanced_partition(lengths, count)
    if same_count_on_all_ranks:
        synced = min(_all_reduce_max(count), len(batch))
        if synced != count:
            count, groups = synced, balanced_partition(lengths, synced)
    indices = [torch.tensor(group, dtype=torch.long) for group in groups]
    parts = [batch[index] for index in indices]
    return BatchParts(parts, indices, [sum(lengths[i] for i in group) for group in groups])


# ------------------------------------------------------------------------------------- optimizer and schedule


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


# ------------------------------------------------------------------------------------------- the train engine


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
        self.device = torch_device(device)
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


# --------------------------------------------------------------------------------- mini-batch PPO-style loops


@dataclass
class MicroLoss:
    """What a role's loss function returns for one micro-batch.

    `loss` is already scaled so that summing it over the micro-batches of every rank gives the mini-batch loss
    times the world size (DDP and FSDP2 then average gradients over ranks). `loss_terms` are detached parts of it
    reported as losses; `token_means` are detached per-token averages over this micro-batch's valid tokens.
    """

    loss: Tensor
    loss_terms: dict[str, Tensor]
    token_means: dict[str, Tensor]


def loss_denominator(response_mask: Tensor, loss_agg_mode: str, world_size: int) -> float:
    """Each rank's share of the mini-batch's normaliser, so that accumulated and averaged losses equal the loss of
    the whole global mini-batch: the global count of valid tokens (token-mean) or of non-empty sequences (the
    seq-mean modes), summed over ranks with an all_reduce, divided by the world size."""
    if loss_agg_mode == "token-mean":
        local = (response_mask != 0).sum()
    else:
        local = ((response_mask != 0).sum(dim=-1) > 0).sum()
    total = all_reduce_sum(local.to(torch.float64).reshape(1))
    return float(total.item()) / world_size


def run_mini_batches(
    engine: TrainEngine,
    batch: Batch,
    *,
    mini_batch_size: int,
    micro_batch_size: int,
    token_budget: int | None,
    epochs: int,
    shuffle_generator: torch.Generator | None,
    loss_agg_mode: str,
    micro_loss: Callable[[Batch, float], MicroLoss],
    prefix: str,
) -> dict[str, float]:
    """`epochs` passes over this rank's shard in mini-batches of `mini_batch_size` rows (shuffled each epoch when a
    generator is given); each mini-batch is one optimizer step over gradients accumulated from its micro-batches.

    Returns the metrics under `prefix`, equal on every rank: each loss term as the mean over mini-batches of the
    global mini-batch loss, each token mean over all valid tokens of every rank, the mean grad norm and the mean
    learning rate of the optimizer steps.
    """
    rows = len(batch)
    if mini_batch_size < 1 or rows % mini_batch_size:
        raise ValueError(
            f"this rank got {rows} samples, which do not split into mini-batches of {mini_batch_size} samples "
            f"(ppo_mini_batch_size × rollout.n / dp_size); every rank must take the same number of optimizer steps, "
            "so make the batch a multiple of ppo_mini_batch_size × rollout.n"
        )
    engine.module.train()
    loss_sums: dict[str, Tensor] = {}
    token_sums: dict[str, Tensor] = {}
    tokens = torch.zeros((), dtype=torch.float64, device=engine.device)
    grad_norms: list[float] = []
    lrs: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(rows, generator=shuffle_generator) if shuffle_generator is not None else None
        for start in range(0, rows, mini_batch_size):
            window = slice(start, start + mini_batch_size)
            mini = batch[order[window] if order is not None else window].to(engine.device)
            denominator = loss_denominator(mini["response_mask"], loss_agg_mode, engine.world_size)
            parts = micro_batches(
                mini,
                micro_batch_size,
                token_budget,
                same_count_on_all_ranks=engine.strategy == "fsdp2",
            )
            for index, micro in enumerate(parts):
                with engine.gradient_sync(index == len(parts) - 1):
                    with engine.autocast():
                        result = micro_loss(micro, denominator)
                    result.loss.backward()
                micro_tokens = (micro["response_mask"] != 0).sum().to(torch.float64)
                tokens += micro_tokens
                for key, value in result.loss_terms.items():
                    loss_sums[key] = loss_sums.get(key, tokens.new_zeros(())) + value.detach().to(torch.float64)
                for key, value in result.token_means.items():
                    weighted = value.detach().to(torch.float64) * micro_tokens
                    token_sums[key] = token_sums.get(key, tokens.new_zeros(())) + weighted
            grad_norm, lr = engine.step()
            grad_norms.append(grad_norm)
            lrs.append(lr)
    # One all_reduce for every metric: [loss sums..., token sums..., token count].
    loss_keys, token_keys = sorted(loss_sums), sorted(token_sums)
    stacked = torch.stack([loss_sums[k] for k in loss_keys] + [token_sums[k] for k in token_keys] + [tokens])
    packed: list[float] = all_reduce_sum(stacked).tolist()
    steps = len(grad_norms)
    metrics = {f"{prefix}/{k}": packed[i] / (engine.world_size * steps) for i, k in enumerate(loss_keys)}
    total_tokens = max(packed[-1], 1.0)
    metrics |= {f"{prefix}/{k}": packed[len(loss_keys) + i] / total_tokens for i, k in enumerate(token_keys)}
    metrics[f"{prefix}/grad_norm"] = sum(grad_norms) / steps
    metrics[f"{prefix}/lr"] = sum(lrs) / steps
    # Optimizer steps skipped for a non-finite gradient norm (TrainEngine.step): the loop stops a run that only skips.
    metrics[f"{prefix}/skipped_steps"] = float(sum(not math.isfinite(norm) for norm in grad_norms))
    metrics[f"{prefix}/optimizer_steps"] = float(steps)
    return metrics


def mean_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """`shard` collect for update endpoints: one metrics dict, each value averaged over the ranks' dicts."""
    keys = per_rank[0].keys()
    return {key: sum(metrics[key] for metrics in per_rank) / len(per_rank) for key in keys}


def load_rank_state(folder: Path, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's training state from a checkpoint's `folder/rank{rank}.pt`, checked against the world size."""
    file = folder / f"rank{rank}.pt"
    if not file.is_file():
        raise FileNotFoundError(f"no {file}: the checkpoint lacks this rank's training state (was it fully written?)")
    # weights_only: a checkpoint may come from elsewhere, and a pickle can run code; capture_rng keeps RNG states to
    # tensors and plain tuples so this loads.
    state: dict[str, Any] = torch.load(file, map_location="cpu", weights_only=True)
    if state["world_size"] != world_size:
        raise ValueError(
            f"{folder} was written by {state['world_size']} data-parallel ranks but this mesh has {world_size}; "
            "optimizer states are per rank: resume with the same dp_size"
        )
    return state


def require_fields(batch: Batch, fields: list[str], endpoint: str) -> None:
    """Raise a KeyError naming every field `endpoint` needs that the batch lacks."""
    missing = [field for field in fields if field not in batch]
    if missing:
        raise KeyError(f"{endpoint} needs batch fields {missing}, which are missing; the batch has {batch.keys()}")
