"""Loading Hugging Face-named tensors into a live vLLM 0.32 model in place, CPU layers packed by oneDNN included.

On CPU, vLLM packs every unquantized linear layer into a oneDNN (or SGL) handle at load time and empties
`layer.weight` (`dispatch_cpu_unquantized_gemm(..., remove_weight=True)`); the tied lm_head keeps its weight but is
packed too. Measured here (logprob parity with the HF model, DESIGN.md): `model.load_weights` alone fails
("'Parameter' object has no attribute 'weight_loader'"), `model_runner.reload_weights` leaves layers stale (diff 0.86).
What works (diff 9.5e-7): give each emptied layer back an unpacked weight Parameter with its weight_loader, load with
HF names (vLLM stacks q/k/v and gate/up itself), then re-run process_weights_after_loading on every linear and
vocab-embedding layer, which packs the new weights. On GPU, plain `load_weights` writes the parameters in place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class InPlaceLoader:
    """begin(), then load() once per bucket, then finish(); `repack` says whether the CPU recipe runs."""

    def __init__(self, model: torch.nn.Module, repack: bool) -> None:
        self.model = model
        self.repack = repack

    def begin(self) -> int:
        """CPU: give emptied linear layers unpacked weight Parameters again; returns how many were restored."""
        return restore_unpacked_weights(self.model) if self.repack else 0

    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.model.load_weights(named_tensors)  # type: ignore[operator]

    def finish(self) -> int:
        """CPU: pack the new weights (oneDNN handles, tied lm_head included); returns how many layers were packed."""
        return repack_weights(self.model) if self.repack else 0


def restore_unpacked_weights(model: torch.nn.Module) -> int:
    """Re-create the weight Parameter of every linear layer whose packing emptied it, as vLLM created it at init
    (same Parameter class, shape, weight_loader and input/output dims), so load_weights can fill it."""
    from vllm.model_executor.layers.linear import (
        WEIGHT_LOADER_V2_SUPPORTED,
        LinearBase,
        ReplicatedLinear,
        UnquantizedLinearMethod,
    )

    restored = 0
    layer: Any
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase):
            continue
        weight = getattr(layer, "weight", None)
        if weight is None or weight.numel() > 0:
            continue  # never packed (a fallback path kept the weight): load_weights writes it in place
        method = layer.quant_method
        if not isinstance(method, UnquantizedLinearMethod):
            raise NotImplementedError(
                f"in-place weight sync on CPU supports unquantized models; layer {name!r} uses "
                f"{type(method).__name__}. Serve an unquantized checkpoint, or sync on GPU."
            )
        input_size_per_partition: Any
        weight_loader: Any
        output_partition_sizes: Any = layer.output_partition_sizes
        if isinstance(layer, ReplicatedLinear):
            input_size_per_partition, weight_loader = layer.input_size, layer.weight_loader
        else:
            input_size_per_partition = layer.input_size_per_partition
            uses_v2 = type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED
            weight_loader = layer.weight_loader_v2 if uses_v2 else layer.weight_loader
        method.create_weights(
            layer,
            input_size_per_partition=input_size_per_partition,
            output_partition_sizes=[int(size) for size in output_partition_sizes],
            input_size=layer.input_size,
            output_size=layer.output_size,
            params_dtype=layer.params_dtype,
            weight_loader=weight_loader,
        )
        restored += 1
    return restored


def repack_weights(model: torch.nn.Module) -> int:
    """Run process_weights_after_loading again on every linear and vocab-embedding layer (the CPU packing)."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    packed = 0
    layer: Any
    for layer in model.modules():
        if isinstance(layer, (LinearBase, VocabParallelEmbedding)):
            layer.quant_method.process_weights_after_loading(layer)
            packed += 1
    return packed
