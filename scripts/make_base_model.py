"""Builds the embedded default base model: a tiny Qwen2 SFT-trained to weak arithmetic, saved in Hugging Face layout."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlmesh.data.synthetic import make_task_rows
from rlmesh.models.tiny import (
    SFT_SCHEDULES,
    TINY_ARITH_PATH,
    build_char_tokenizer,
    build_tiny_qwen2,
    evaluate_exact_match,
    greedy_token_ids,
    prompt_ids,
    save_tiny_model,
    sft,
)

# The default recipe's task: 2-digit addition. Its train split holds 8,000 problems, the test split the other 2,000.
TASK = "arithmetic"
TRAIN_ROWS = 8000
EVAL_ROWS = 500
# Greedy answers to 2-digit additions are at most 3 digits and the eos; 6 leaves room to see a model not stopping.
MAX_NEW_TOKENS = 6
VLLM_CHECK_ROWS = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=TINY_ARITH_PATH, help="folder to write (default: the asset)")
    # The schedule decides how well RL learns from the base, more than its accuracy does. Measured with the default
    # GRPO recipe (32 prompts x 16 samples, lr 1e-4), held-out greedy exact match on 1,000 test problems:
    #   constant lr 1e-3, 300 steps: base 17.5% -> 53% after 50 RL steps, 68% after 200, 77% after 400;
    #   cosine to zero, 325 steps:   base 25.3% -> 20% after 50 (a dip), 23% after 200, 33% after 400;
    #   cosine to zero, 400 steps:   base 23.7% -> 17% after 50, 20% after 200, 27% after 400.
    # A cosine-annealed model samples worse for its greedy accuracy (7.7% at temperature 1 for 25.3% greedy, against
    # 9.1% for 17.5%), and RL first loses accuracy on it. With the constant schedule accuracy grows smoothly with
    # steps (seed 0: 13.9% after 250, 18.1% after 300, 19.5% after 325; seeds 1 and 2 after 300: 15.2%, 18.0%), so
    # 300 steps lands inside the 10-40% the RL recipe wants for every seed tried: weak, with reward to learn from.
    parser.add_argument("--steps", type=int, default=300, help="SFT steps")
    parser.add_argument(
        "--schedule", default="constant", choices=SFT_SCHEDULES, help="SFT learning-rate schedule after the warmup"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the batch order")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=64, help="problems per SFT step")
    parser.add_argument("--eval-rows", type=int, default=EVAL_ROWS, help="held-out problems to measure accuracy on")
    parser.add_argument(
        "--check-vllm",
        action="store_true",
        help="load the folder in vLLM, compare greedy output with HF",
    )
    parser.add_argument("--skip-build", action="store_true", help="only check the existing --out folder (with vLLM)")
    parser.add_argument(
        "--vllm-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype vLLM runs the check in"
    )
    return parser.parse_args()


def build(args: argparse.Namespace) -> None:
    """Builds the tokenizer and model, SFT-trains it, prints its held-out accuracy and writes the folder."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, seed=args.seed)
    train_rows = make_task_rows(TASK, TRAIN_ROWS, seed=args.seed, split="train")
    # A fixed seed for the held-out problems, so accuracies of models trained with different seeds compare.
    test_rows = make_task_rows(TASK, args.eval_rows, seed=0, split="test")
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"tiny Qwen2: {parameters:,} parameters, vocabulary {len(tokenizer)}")

    started = time.perf_counter()
    losses = sft(
        model,
        tokenizer,
        train_rows,
        args.steps,
        args.lr,
        args.seed,
        args.batch_size,
        log_every=50,
        schedule=args.schedule,
    )
    train_seconds = time.perf_counter() - started
    accuracy = evaluate_exact_match(model, tokenizer, test_rows)
    print(f"SFT: {args.steps} steps in {train_seconds:.1f}s, final loss {losses[-1]:.4f}")
    print(f"held-out greedy exact match on {len(test_rows)} {TASK} test problems: {accuracy:.1%}")

    command = (
        f"python scripts/make_base_model.py --steps {args.steps} --schedule {args.schedule} --seed {args.seed} "
        f"--lr {args.lr} --batch-size {args.batch_size}"
    )
    notes = (
        "# tiny-arith\n\n"
        "The base model of `python -m rlmesh.train recipe=grpo`: a Qwen2-architecture causal LM of "
        f"{parameters:,} parameters with a {len(tokenizer)}-token character vocabulary, SFT-trained on 2-digit "
        "addition ('23+45=' -> '68<|endoftext|>') to weak accuracy, so RL has something to improve.\n\n"
        f"Made by `{command}` (rlmesh.models.tiny).\n\n"
        f"Held-out greedy exact match: {accuracy:.1%} on {len(test_rows)} test problems "
        f"(SFT {args.steps} steps, {args.schedule} learning rate, final loss {losses[-1]:.4f}).\n"
    )
    save_tiny_model(model, tokenizer, args.out, notes=notes)
    print(f"wrote {args.out}")


def check_vllm(path: Path, dtype: Literal["float32", "bfloat16"]) -> None:
    """Loads `path` with vLLM (offline, on CPU here) and with transformers, greedy-decodes held-out prompts in both,
    and prints how many token sequences differ and the largest gap between their log-probs of the same tokens."""
    # vLLM on CPU reserves VLLM_CPU_KVCACHE_SPACE GiB for its KV cache; 1 holds 131k tokens of this model, plenty.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    rows = make_task_rows(TASK, VLLM_CHECK_ROWS, seed=0, split="test")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_completions = greedy_token_ids(model, tokenizer, rows, MAX_NEW_TOKENS)
    # gpu_memory_utilization is a fraction of host RAM on CPU; the KV cache size above is what counts here.
    llm = LLM(model=str(path), dtype=dtype, gpu_memory_utilization=0.05, max_model_len=64, enforce_eager=True, seed=0)
    sampling = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, logprobs=0, skip_special_tokens=False)
    encoded = [prompt_ids(tokenizer, row) for row in rows]
    requests: list[Any] = [{"prompt_token_ids": ids} for ids in encoded]
    outputs = llm.generate(requests, sampling)
    # The same prompts through vLLM's own chat-template path must give the same token ids.
    chat_outputs = llm.chat([row["prompt"] for row in rows[:4]], sampling)
    chat_ids_match = all(out.prompt_token_ids == ids for out, ids in zip(chat_outputs, encoded[:4], strict=True))
    mismatches, max_logprob_gap = 0, 0.0
    for ids, hf_completion, output in zip(encoded, hf_completions, outputs, strict=True):
        completion = output.outputs[0]
        # Token ids, not text: vLLM leaves the eos out of the text even with skip_special_tokens=False.
        if list(completion.token_ids) != hf_completion:
            mismatches += 1
            print(f"greedy mismatch on {tokenizer.decode(ids)!r}: HF {hf_completion}, vLLM {completion.token_ids}")
        with torch.no_grad():
            logits = model(torch.tensor([ids + list(completion.token_ids)])).logits[0]
        hf_logprobs = torch.log_softmax(logits.float(), dim=-1)
        assert completion.logprobs is not None, "vLLM returned no logprobs although SamplingParams asked for them"
        for offset, (token, vllm_logprobs) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
            assert vllm_logprobs is not None
            hf_logprob = hf_logprobs[len(ids) + offset - 1, token].item()
            max_logprob_gap = max(max_logprob_gap, abs(hf_logprob - vllm_logprobs[token].logprob))
    example = outputs[0].outputs[0]
    print(f"vLLM greedy on {tokenizer.decode(encoded[0])!r}: {example.text!r} {list(example.token_ids)}")
    print(
        f"vLLM ({dtype}) vs HF (float32) on {len(rows)} held-out prompts: {mismatches} greedy token mismatches, "
        f"max |logprob gap| {max_logprob_gap:.2e}, chat template gives the same prompt ids: {chat_ids_match}"
    )


def main() -> None:
    args = parse_args()
    if not args.skip_build:
        build(args)
    if args.check_vllm or args.skip_build:
        check_vllm(args.out, args.vllm_dtype)


if __name__ == "__main__":
    main()
