"""Hugging Face models in and out: loading a policy, a value model or a tokenizer, reading weights, parameter names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlmesh.config import ModelConfig
from rlmesh.engine.devices import resolve_device, resolve_dtype
from rlmesh.sync.manifest import hf_name


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
    nn.Module.to(model, resolve_device(device))  # in place; PreTrainedModel.to has a wrapper type mypy cannot call
    return model


def load_causal_lm(model_config: ModelConfig, device: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The Hugging Face causal LM at model_config.path on `device`, in `dtype` (default: model_config.dtype)."""
    dtype = dtype or resolve_dtype(model_config.dtype, device=device)
    model = AutoModelForCausalLM.from_pretrained(model_config.path, **_from_pretrained_options(model_config, dtype))
    return _prepare(model, model_config, device)


def load_value_model(model_config: ModelConfig, device: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A value model: the LM backbone at model_config.path plus a 1-output linear head on every token.

    AutoModelForTokenClassification(num_labels=1), as verl's critic: the backbone loads from a causal-LM
    checkpoint, the head `score` is new (initialised from torch's current seed), and dropout on the head is
    turned off so that a value is a deterministic function of the tokens, in train mode too.
    """
    dtype = dtype or resolve_dtype(model_config.dtype, device=device)
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
