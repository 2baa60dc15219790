"""Builds the agentic default's base model: a tiny Qwen2 SFT-trained to answer 2-digit products, calling its
calculator on a minority of them, so that RL has tool use to discover."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from rlmesh.data.synthetic import make_task_rows
from rlmesh.envs import ChatTurns, EpisodeLimits, episode_metrics, run_episode
from rlmesh.envs.calculator import CalculatorArithmetic
from rlmesh.models.tiny import (
    ASSETS_PATH,
    build_tiny_qwen2,
    build_tool_tokenizer,
    calculator_sft_example,
    save_tiny_model,
    sft,
)

TASK, DIFFICULTY = "arithmetic", {"digits": 2, "operators": "*"}  # recipes/grpo_tool.yaml's data
TRAIN_ROWS = 6000
LIMITS = EpisodeLimits(max_turns=3, max_total_tokens=64, max_tokens_per_turn=12, tool_timeout_s=5.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ASSETS_PATH / "tiny-calc", help="folder to write")
    # The share of demonstrations that call the calculator: the base model's tool-use rate, and so (with copying
    # learned and products not) roughly its success rate.
    parser.add_argument("--tool-fraction", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=400, help="SFT steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-rows", type=int, default=300)
    return parser.parse_args()


def hf_turn_sampler(model: Any, tokenizer: Any, temperature: float, seed: int) -> Any:
    """run_episode's generate, by transformers' generate (greedy at temperature 0): the model's turn on the context."""
    generator_seed = iter(range(seed, seed + 10**9))

    async def generate(context: list[int], max_tokens: int) -> Any:
        torch.manual_seed(next(generator_seed))
        ids = torch.tensor([context])
        with torch.no_grad():
            output = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=None,
                top_p=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        response = output[0, len(context) :].tolist()
        ended = tokenizer.eos_token_id in response
        if ended:
            response = response[: response.index(tokenizer.eos_token_id) + 1]
        return SimpleNamespace(
            response_ids=response,
            logprobs=[0.0] * len(response),
            weight_version=0,
            last_weight_version=None,
            finish_reason="stop" if ended else "length",
        )

    return generate


def evaluate(model: Any, tokenizer: Any, rows: list[dict[str, Any]], temperature: float) -> dict[str, float]:
    """Success (the environment's reward) and tool use over one episode per row, as the agent loop plays them."""
    turns = ChatTurns(tokenizer)
    generate = hf_turn_sampler(model, tokenizer, temperature, seed=0)

    async def play_all() -> list[Any]:
        played = []
        for row in rows:  # the row as the agent loop hands it to reset
            episode_row = {"prompt": row["prompt"], "ground_truth": row["reward_model"]["ground_truth"]}
            played.append(await run_episode(CalculatorArithmetic(), episode_row, generate, turns, LIMITS))
        return played

    episodes = asyncio.run(play_all())
    success = sum(float(e.reward or 0.0) for e in episodes) / len(episodes)
    used_tool = sum(e.tool_calls > 0 for e in episodes) / len(episodes)
    return {"success": success, "tool_use": used_tool} | episode_metrics(episodes)


def main() -> None:
    args = parse_args()
    tokenizer = build_tool_tokenizer()
    model = build_tiny_qwen2(tokenizer, seed=args.seed)
    train_rows = make_task_rows(TASK, TRAIN_ROWS, seed=args.seed, split="train", **DIFFICULTY)
    test_rows = make_task_rows(TASK, args.eval_rows, seed=0, split="test", **DIFFICULTY)
    rng = random.Random(args.seed)
    examples = [calculator_sft_example(tokenizer, row, rng.random() < args.tool_fraction) for row in train_rows]
    parameters = sum(p.numel() for p in model.parameters())
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
        log_every=100,
        schedule="constant",
        examples=examples,
    )
    print(f"SFT: {args.steps} steps in {time.perf_counter() - started:.1f}s, final loss {losses[-1]:.4f}")
    greedy = evaluate(model, tokenizer, test_rows, temperature=0.0)
    sampled = evaluate(model, tokenizer, test_rows, temperature=1.0)
    for name, result in (("greedy", greedy), ("temperature 1", sampled)):
        print(f"{name}: success {result['success']:.1%}, tool use {result['tool_use']:.1%} on {len(test_rows)} rows")
    command = (
        f"python scripts/make_tool_model.py --tool-fraction {args.tool_fraction} --steps {args.steps} "
        f"--seed {args.seed} --lr {args.lr} --batch-size {args.batch_size}"
    )
    notes = (
        "# tiny-calc\n\n"
        "The base model of `python -m rlmesh.train recipe=grpo_tool`: a Qwen2-architecture causal LM of "
        f"{parameters:,} parameters with a {len(tokenizer)}-token vocabulary (characters, plus the chat's and the "
        "calculator call's fixed strings as whole tokens), SFT-trained on 2-digit products ('47*83=') where "
        f"{args.tool_fraction:.0%} of the demonstrations call the calculator and copy its answer, and the rest "
        "answer directly.\n\n"
        f"Made by `{command}` (rlmesh.models.tiny).\n\n"
        f"Held-out success on {len(test_rows)} test problems, episodes as the agent loop plays them: greedy "
        f"{greedy['success']:.1%} (tool use {greedy['tool_use']:.1%}), temperature 1 {sampled['success']:.1%} "
        f"(tool use {sampled['tool_use']:.1%}); SFT {args.steps} steps, final loss {losses[-1]:.4f}.\n"
    )
    save_tiny_model(model, tokenizer, args.out, notes=notes)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
