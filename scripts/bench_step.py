"""Median GRPO step of rlmesh (rollout=vllm, rollout=hf) against a plain single-process torch + transformers loop on
the same work, side by side from one run.

The plain loop is what a user would write without a framework: one process, HF `generate`, the reward function,
GRPO advantages, one PPO-clip update (the same loss, AdamW and warmup schedule, gradient clipping and micro-batches
as the recipe's trainer), all on the same base model, prompts and sampling settings. It keeps the trainer's work
identical: old log-probs are the update forward's own (on-policy, one mini-batch per step, as the default recipe
with recompute_old_logprobs=false), and it reports the entropy the trainer reports.

    python scripts/bench_step.py                        # the default recipe (recipe=grpo), 12 steps each
    python scripts/bench_step.py --steps 20 --only plain,vllm roles.rollout.max_num_seqs=512
    python scripts/bench_step.py --workload gen-bound   # a 19M-parameter random Qwen2, 8 x 8 x 128 tokens

`vllm_1off` is rollout=vllm with trainer.mode=one_step_off: each step's batch was generated while the step before
it trained, so its gen column is overlapped time, not time the step waited.

The gen-bound workload is where the engine must pay for itself: a random-init model of about 20M parameters, with
eos masked (sampling.min_tokens = max_tokens) so every response runs to the 128-token cap; it also prints generated
tokens/s per system.

Prints, per system, the median step and the median generation and update phases over the steps after the first
two (warm-up), and each step's ratio to the plain loop's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlmesh.algo.advantages import compute_grpo_advantage  # noqa: E402
from rlmesh.algo.logits import entropy_from_logits, logprobs_from_logits  # noqa: E402
from rlmesh.algo.losses import compute_policy_loss_vanilla  # noqa: E402
from rlmesh.config import RlmeshConfig  # noqa: E402
from rlmesh.engine.train_engine import build_optimizer, build_scheduler  # noqa: E402
from rlmesh.reward.registry import default_compute_score  # noqa: E402

WARMUP_STEPS = 2  # first allocations, lazy imports, the engines' first batches
# rlmesh systems: the overrides that select each; vllm_1off generates the next batch while the trainer trains
RLMESH_SYSTEMS = {
    "hf": ["rollout=hf"],
    "vllm": ["rollout=vllm"],
    "vllm_1off": ["rollout=vllm", "trainer.mode=one_step_off"],
}
SYSTEMS = ("plain", *RLMESH_SYSTEMS)
# 8 prompts x 8 samples x 128 tokens on a random 19M-parameter Qwen2 (8 layers, hidden 384, MLP 1536).
GEN_BOUND_MODEL = {
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "max_position_embeddings": 256,
}
GEN_BOUND_TOKENS = 128
GEN_BOUND = [
    "data.train_batch_size=8",
    "roles.rollout.n=8",
    f"roles.rollout.sampling.max_tokens={GEN_BOUND_TOKENS}",
    f"roles.rollout.sampling.min_tokens={GEN_BOUND_TOKENS}",
    f"roles.rollout.max_model_len={GEN_BOUND_TOKENS + 32}",
    "roles.trainer.ppo_mini_batch_size=8",
    "roles.trainer.ppo_micro_batch_size_per_device=64",
]


def gen_bound_model(folder: Path) -> Path:
    """The gen-bound workload's random-init model, saved in HF layout with the tiny character tokenizer."""
    from rlmesh.models.tiny import build_char_tokenizer, build_tiny_qwen2, save_tiny_model

    tokenizer = build_char_tokenizer()
    tokenizer.model_max_length = GEN_BOUND_MODEL["max_position_embeddings"]
    model = build_tiny_qwen2(tokenizer, seed=0, **GEN_BOUND_MODEL)
    print(f"gen-bound model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    return save_tiny_model(model, tokenizer, folder / "gen-bound-model")


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import rlmesh.train  # noqa: F401  # registers the config schema and the asset resolver

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=["recipe=grpo", *overrides])


def plain_loop(cfg: RlmeshConfig, steps: int) -> list[dict[str, float]]:
    """The recipe's GRPO steps in one process; per step: timing_s/{step,gen,reward,adv,update_actor}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlmesh.train import build_prompts

    torch.manual_seed(cfg.trainer.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    loader, _, _ = build_prompts(cfg, tokenizer)
    actor, rollout = cfg.roles.trainer, cfg.roles.rollout
    optim = replace(actor.optim, total_training_steps=steps)
    optimizer = build_optimizer(model.parameters(), optim)
    scheduler = build_scheduler(optimizer, optim, steps)
    n, sampling = rollout.n, rollout.sampling
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    history = []
    for _ in range(steps):
        timing: dict[str, float] = {}
        started = time.perf_counter()
        prompts = loader.next_batch()
        # generation: left-padded prompts, n samples each
        width = max(len(p["prompt_ids"]) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p["prompt_ids"])) + list(p["prompt_ids"]) for p in prompts])
        lengths = torch.tensor([len(p["prompt_ids"]) for p in prompts])
        attention = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
        t = time.perf_counter()
        model.eval()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=attention,
                do_sample=True,
                temperature=sampling.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=sampling.max_tokens,
                min_new_tokens=sampling.min_tokens or None,
                num_return_sequences=n,
                pad_token_id=pad,
                eos_token_id=eos,
            )
        responses = out[:, width:]
        # a response ends at its first eos, which it keeps; generate pads the rest
        is_eos = (responses == eos).long()
        response_mask = (torch.cumsum(is_eos, dim=1) - is_eos == 0).float()
        timing["gen"] = time.perf_counter() - t
        generated = float(response_mask.sum())
        # reward
        t = time.perf_counter()
        scores = torch.zeros(len(responses))
        for i, row in enumerate(responses.tolist()):
            prompt = prompts[i // n]
            length = int(response_mask[i].sum())
            text = tokenizer.decode(row[:length], skip_special_tokens=True)
            value = default_compute_score(prompt["data_source"], text, prompt["ground_truth"], prompt["extra_info"])
            scores[i] = float(value["score"] if isinstance(value, dict) else value)
        timing["reward"] = time.perf_counter() - t
        # advantages: the score on each response's last token, normalised within its prompt's group
        t = time.perf_counter()
        last = (response_mask.sum(dim=1) - 1).clamp_min(0).long()
        token_rewards = torch.zeros_like(response_mask)
        token_rewards[torch.arange(len(scores)), last] = scores
        groups = torch.arange(len(prompts)).repeat_interleave(n)
        advantages, _ = compute_grpo_advantage(token_rewards, response_mask, group_ids=groups)
        timing["adv"] = time.perf_counter() - t
        # update: one mini-batch (the whole batch), gradients accumulated over micro-batches
        t = time.perf_counter()
        model.train()
        full_attention = torch.cat([attention.repeat_interleave(n, dim=0), response_mask.long()], dim=1)
        positions = (torch.cumsum(full_attention, dim=1) - 1).clamp_min(0)
        entropy_sum = torch.zeros(())
        total_tokens = float(response_mask.sum())
        micro = actor.ppo_micro_batch_size_per_device
        for start in range(0, len(out), micro):
            rows = slice(start, start + micro)
            logits = model(
                input_ids=out[rows], attention_mask=full_attention[rows], position_ids=positions[rows]
            ).logits
            logits = logits[:, width - 1 : -1] / sampling.temperature
            log_prob = logprobs_from_logits(logits, responses[rows])
            with torch.no_grad():
                entropy_sum += (entropy_from_logits(logits) * response_mask[rows]).sum()
            loss, _ = compute_policy_loss_vanilla(
                log_prob.detach(),
                log_prob,
                advantages[rows],
                response_mask[rows],
                loss_agg_mode=actor.loss_agg_mode,
                clip_ratio=actor.clip_ratio,
                clip_ratio_c=actor.clip_ratio_c,
                denominator=total_tokens,
            )
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        timing["update_actor"] = time.perf_counter() - t
        timing["step"] = time.perf_counter() - started
        history.append(
            {f"timing_s/{k}": v for k, v in timing.items()}
            | {"critic/score/mean": float(scores.mean()), "actor/entropy": float(entropy_sum) / total_tokens}
            | {"response_length/mean": generated / len(responses)}
        )
    return history


def rlmesh_run(overrides: list[str], steps: int) -> list[dict[str, float]]:
    """The recipe through `rlmesh.train.run` (Ray, the roles' actors); its per-step metrics."""
    from rlmesh.train import run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(
            [
                f"trainer.total_steps={steps}",
                "trainer.val_before_train=false",
                "trainer.test_freq=-1",
                "trainer.save_freq=0",
                "trainer.progress_bar=false",
                "trainer.logger=[jsonl]",
                f"trainer.output_dir={tmp}/run",
                *overrides,
            ]
        )
        run(cfg)
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "timing_s/step" in m]


def medians(history: list[dict[str, float]], samples: int) -> dict[str, float]:
    kept = history[WARMUP_STEPS:]
    keys = ("step", "gen", "update_actor", "reward")
    result = {key: statistics.median(m[f"timing_s/{key}"] for m in kept) for key in keys}
    # generated tokens per second of the generation phase, each step's own, then the median
    result["gen_tokens_per_s"] = statistics.median(
        m["response_length/mean"] * samples / m["timing_s/gen"] for m in kept
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--only", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--workload", choices=("default", "gen-bound"), default="default")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every system (the plain loop reads them)")
    args = parser.parse_args()
    chosen = [s for s in args.only.split(",") if s]
    if unknown := set(chosen) - set(SYSTEMS):
        parser.error(f"--only: unknown system(s) {sorted(unknown)}; choose from {list(SYSTEMS)}")
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    with tempfile.TemporaryDirectory() as tmp:
        overrides = list(args.overrides)
        if args.workload == "gen-bound":
            overrides = [f"model.path={gen_bound_model(Path(tmp))}", *GEN_BOUND, *overrides]
        typed: RlmeshConfig = OmegaConf.to_object(compose(overrides))  # type: ignore[assignment]
        samples = typed.data.train_batch_size * typed.roles.rollout.n
        results: dict[str, dict[str, float]] = {}
        for system in chosen:
            started = time.perf_counter()
            if system == "plain":
                history = plain_loop(typed, args.steps)
            else:
                history = rlmesh_run([*RLMESH_SYSTEMS[system], *overrides], args.steps)
            results[system] = medians(history, samples)
            print(f"{system}: {args.steps} steps in {time.perf_counter() - started:.1f}s (with start-up)", flush=True)
    base = results.get("plain", {}).get("step")
    span = f"steps {WARMUP_STEPS + 1}-{args.steps}"
    print(f"\n{args.workload} workload, {samples} samples a step; median over {span} (s)")
    print(f"{'system':<14}{'step':>8}{'gen':>8}{'update':>8}{'reward':>8}{'gen tok/s':>11}{'step / plain':>14}")
    names = {"plain": "plain loop", "hf": "rlmesh hf", "vllm": "rlmesh vllm", "vllm_1off": "vllm 1-off"}
    for system, m in results.items():
        ratio = f"{m['step'] / base:.2f}x" if base else "-"
        phases = f"{m['step']:>8.3f}{m['gen']:>8.3f}{m['update_actor']:>8.3f}{m['reward']:>8.3f}"
        print(f"{names[system]:<14}{phases}{m['gen_tokens_per_s']:>11,.0f}{ratio:>14}")


if __name__ == "__main__":
    main()
