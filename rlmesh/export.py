"""`rlmesh export CHECKPOINT OUT`: a checkpoint's policy as a clean Hugging Face folder (safetensors weights, config,
tokenizer, generation config) that transformers and vLLM load, written atomically."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlmesh.checkpoint import STALE_PREFIX, policy_folder
from rlmesh.engine.model_io import tied_aliases

WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Write the policy of `checkpoint` (a run folder, a checkpoint or an HF model folder) to the new folder `out`:
    the weights copied byte for byte (or cast to `dtype`), config.json, the tokenizer, and a generation config with
    the tokenizer's eos and pad ids where the checkpoint has none. Nothing else: no optimizer or RNG state. The
    folder appears complete or not at all; its weights are checked against the architecture first."""
    source = policy_folder(checkpoint)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; export into a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STALE_PREFIX}{out.name}-", dir=out.parent))
    try:
        config = AutoConfig.from_pretrained(source)
        if dtype is None:
            for pattern in (*WEIGHT_PATTERNS, "config.json"):
                for file in source.glob(pattern):
                    shutil.copy2(file, staging / file.name)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), use_safetensors=True)
            model.save_pretrained(staging, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(source)
        tokenizer.save_pretrained(staging)
        generation_config(source, config, tokenizer).save_pretrained(staging)
        check_weights(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def generation_config(source: Path, config: object, tokenizer: object) -> GenerationConfig:
    """The checkpoint's generation_config.json, else one from the model config, with the tokenizer's special ids
    filled in where it names none (vLLM and generate() stop on its eos_token_id)."""
    if (source / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(source)
    else:
        generation = GenerationConfig.from_model_config(config)  # type: ignore[arg-type]
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(generation, name, None) is None and getattr(tokenizer, name, None) is not None:
            setattr(generation, name, getattr(tokenizer, name))
    return generation


def check_weights(folder: Path) -> None:
    """The safetensors in `folder` hold exactly the architecture's parameters (tied copies excepted), with the
    shapes it expects; built on the meta device, so no weights are loaded."""
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    aliases = tied_aliases(model)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in aliases}
    stored: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118  # safe_open has keys(), not iteration
                stored[name] = tuple(weights.get_slice(name).get_shape())
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    reshaped = sorted(name for name in set(expected) & set(stored) if expected[name] != stored[name])
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{folder}: the weights do not match {config.architectures}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {reshaped[:5]}"
        )
