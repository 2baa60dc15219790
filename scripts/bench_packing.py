"""Packed against padded trainer forwards (model.use_remove_padding) on a bimodal length mix, side by side in one run.

Most responses are short and a few run to the cap, so a padded batch is mostly padding: 60 of 64 sequences are
16 + 8-28 tokens and 4 are 16 + 496, a mean-to-max length ratio of about 1:8. Each repeat runs the trainer's
response forward (log-probs and entropy) and a backward pass, padded then packed, alternating; tokens/s counts real
tokens only. The model is a Qwen2 of about 5M parameters with random weights, built here (no download).

    python scripts/bench_packing.py [--repeats 7] [--rows 64] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlmesh.data.batch import Batch
from rlmesh.engine.forward import response_logprobs

PROMPT, CAP = 16, 512


def bimodal_batch(rows: int, vocab: int, seed: int) -> Batch:
    """Prompts of PROMPT tokens; responses of 8-28 tokens, except one in 16 that runs to CAP - PROMPT."""
    generator = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for row in range(rows):
        length = CAP - PROMPT if row % 16 == 0 else int(torch.randint(8, 29, (), generator=generator))
        prompts.append(torch.randint(3, vocab, (PROMPT,), generator=generator).tolist())
        responses.append(torch.randint(3, vocab, (length,), generator=generator).tolist())
    return Batch.from_generations(prompts, responses, pad_token_id=0, meta={"temperature": 1.0})


def step(model: torch.nn.Module, batch: Batch, packed: bool) -> float:
    started = time.perf_counter()
    logprobs, entropy = response_logprobs(model, batch, with_entropy=True, packed=packed)
    assert entropy is not None
    valid = batch["response_mask"].bool()
    (logprobs[valid].sum() + 0.01 * entropy[valid].sum()).backward()
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=CAP,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(args.device).train()
    batch = bimodal_batch(args.rows, config.vocab_size, seed=0).to(args.device)
    lengths = batch["attention_mask"].sum(dim=1).float()
    real_tokens = int(lengths.sum())
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"{params:.1f}M parameters, {args.rows} sequences, {real_tokens} real tokens of {batch['input_ids'].numel()} "
        f"padded; mean/max length {lengths.mean():.0f}/{lengths.max():.0f} = 1:{lengths.max() / lengths.mean():.1f}"
    )
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(1 + args.repeats):  # the first round warms up allocators and kernels
        for packed in (False, True):
            model.zero_grad(set_to_none=True)
            times[packed].append(step(model, batch, packed))
    padded, packed = (statistics.median(times[key][1:]) for key in (False, True))
    spread = {key: (min(times[key][1:]), max(times[key][1:])) for key in times}
    print(f"\n{'forward + backward':<20}{'median s':>10}{'min-max s':>16}{'real tokens/s':>16}")
    for name, key, median in (("padded", False, padded), ("packed", True, packed)):
        low, high = spread[key]
        print(f"{name:<20}{median:>10.3f}{f'{low:.3f}-{high:.3f}':>16}{real_tokens / median:>16.0f}")
    print(f"\npacked / padded tokens/s: {padded / packed:.2f}x (target >= 1.5x at 1:8)")


if __name__ == "__main__":
    main()
