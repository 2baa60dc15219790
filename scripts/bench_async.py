"""Synchronous, one-step-off and asynchronous training side by side on a long-tailed workload, from one run.

Every system trains the same number of steps (so the same number of samples) of the embedded default on vLLM, with
the response cap raised to 64 tokens and one stop rule added: one prompt in 16 may not stop before the cap. Most
responses stop after a few tokens, and the few that run to the cap are 10x longer, as a reasoning model's longest
are: in sync mode every step waits for them, while one_step_off and async generate the next steps' samples meanwhile
(async also lets a weight sync land on requests in flight).

    python scripts/bench_async.py                       # 20 steps of each system below
    python scripts/bench_async.py --steps 50 --only sync,async1_split roles.rollout.sampling.max_tokens=96

Prints, per system: the wall time of its steps (start-up excluded), its ratio to sync, the median trainer idle ratio
(the fraction of a step spent waiting on generation) and engine idle ratio (rollouter/idle_ratio), the response
lengths, and the mean training reward over the last 10 steps (the reward curves should agree within noise: one step's
score averages 512 samples).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench_step import rlmesh_run

from rlmesh.mesh import endpoint
from rlmesh.roles.rollout.base import Sample
from rlmesh.roles.rollout.vllm import VLLMRollout

# On 2 cores the vLLM engine holds one (its threads are bound to core 0): "split" gives the trainer the other one
# only, so that generation and training overlap without taking each other's core; sync at the default (the trainer
# on both cores) is the fastest synchronous run, and the baseline.
SPLIT = ["roles.trainer.resources_per_device={CPU: 1}"]
SYSTEMS = {
    "sync": ["trainer.mode=sync"],
    "async1": ["trainer.mode=async", "trainer.asynchronous.max_staleness=1"],
    "sync_split": ["trainer.mode=sync", *SPLIT],
    "one_step_off_split": ["trainer.mode=one_step_off", *SPLIT],
    "async1_split": ["trainer.mode=async", "trainer.asynchronous.max_staleness=1", *SPLIT],
    "async2_split": ["trainer.mode=async", "trainer.asynchronous.max_staleness=2", *SPLIT],
}
TAIL_EVERY = 16


def runs_to_cap(prompt_ids: list[int]) -> bool:
    """The stop rule's choice: a fixed one prompt in TAIL_EVERY, by a hash of its tokens (the same in every system)."""
    digest = hashlib.blake2b(str(list(prompt_ids)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % TAIL_EVERY == 0


class LongTailVLLMRollout(VLLMRollout):
    """The vLLM rollout with the benchmark's stop rule: the chosen prompts' samples may not stop before the cap."""

    @endpoint
    async def generate(
        self, prompt_ids: list[int], n: int, sampling: Any = None, seed: int | None = None
    ) -> list[Sample]:
        sampling = sampling or self._config.sampling
        if runs_to_cap(prompt_ids):
            sampling = replace(sampling, min_tokens=sampling.max_tokens)
        return await super().generate(prompt_ids, n, sampling, seed)


LONG_TAIL = [
    "rollout=vllm",
    f"roles.rollout._target_={__name__ if __name__ != '__main__' else 'bench_async'}.LongTailVLLMRollout",
    "roles.rollout.sampling.max_tokens=64",
    "roles.rollout.max_model_len=96",
    "model.use_remove_padding=true",  # packed training: the tail's padding would otherwise cost 10x the tokens
]


def summary(history: list[dict[str, float]]) -> dict[str, float]:
    last = history[-10:]
    return {
        "wall": sum(m["timing_s/step"] for m in history),
        "idle": statistics.median(m["trainer/idle_ratio"] for m in history),
        "engine_idle": statistics.median(m["rollouter/idle_ratio"] for m in history),
        "length_mean": statistics.mean(m["response_length/mean"] for m in history),
        "length_max": max(m["response_length/max"] for m in history),
        "clipped": statistics.mean(m["response_length/clip_ratio"] for m in history),
        "reward": statistics.mean(m["critic/score/mean"] for m in last),
        "staleness": max(m["rollout/staleness/max"] for m in history),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every system, after the long-tail ones")
    args = parser.parse_args()
    chosen = [s for s in args.only.split(",") if s]
    if unknown := set(chosen) - set(SYSTEMS):
        parser.error(f"--only: unknown system(s) {sorted(unknown)}; choose from {list(SYSTEMS)}")
    # The actors import the stop rule's rollout class from this folder (the run puts PYTHONPATH on their path).
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    results: dict[str, dict[str, float]] = {}
    for system in chosen:
        started = time.perf_counter()
        history = rlmesh_run([*LONG_TAIL, *SYSTEMS[system], *args.overrides], args.steps)
        results[system] = summary(history)
        print(f"{system}: {args.steps} steps in {time.perf_counter() - started:.1f}s (with start-up)", flush=True)
    base = results.get("sync", {}).get("wall")
    print(f"\n{args.steps} steps each, 512 samples a step; wall = the steps' own time (s)")
    header = f"{'system':<20}{'wall':>8}{'/ sync':>8}{'idle':>7}{'engine idle':>12}{'len mean':>10}{'len max':>9}"
    print(header + f"{'at cap':>8}{'stale':>7}{'reward':>9}")
    for system, m in results.items():
        ratio = f"{m['wall'] / base:.2f}x" if base else "-"
        row = f"{system:<20}{m['wall']:>8.1f}{ratio:>8}{m['idle']:>7.2f}{m['engine_idle']:>12.2f}"
        row += f"{m['length_mean']:>10.1f}{m['length_max']:>9.0f}"
        print(row + f"{m['clipped']:>8.3f}{m['staleness']:>7.0f}{m['reward']:>9.3f}")


if __name__ == "__main__":
    main()
