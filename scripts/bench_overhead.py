"""Measure the framework's own overhead in default GRPO steps.

Overhead = step time minus the time some role spends inside generation, forward, backward, optimizer, reward or
weight loading. Roles are swapped for subclasses (through `_target_`, as any user would) that record the wall-clock
intervals of their endpoint bodies; the union of those intervals inside each step is the work, the rest is the
controller, scheduling and transfers. Prints the timing_s/* breakdown of a step and the overhead ratio.

Run: python scripts/bench_overhead.py [--steps 10] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from rlmesh.roles.reward import RuleReward
from rlmesh.roles.rollout.hf import HFRollout
from rlmesh.roles.trainer import PolicyTrainer
from rlmesh.train import run

REPO = Path(__file__).resolve().parents[1]
INTERVALS = "RLMESH_BENCH_INTERVALS"  # folder where timed roles append their busy intervals


def _record(role: str, start: float, end: float) -> None:
    with open(Path(os.environ[INTERVALS]) / f"{role}-{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps([start, end]) + "\n")


class TimedTrainer(PolicyTrainer):
    def compute_logprobs(self, batch: Any) -> Any:
        t0 = time.time()
        out = super().compute_logprobs(batch)
        _record("trainer", t0, time.time())
        return out

    def update(self, batch: Any) -> Any:
        t0 = time.time()
        out = super().update(batch)
        _record("trainer", t0, time.time())
        return out

    def export_weights(self) -> Any:
        t0 = time.time()
        out = super().export_weights()
        _record("trainer", t0, time.time())
        return out


class TimedRollout(HFRollout):
    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        out = await super().generate(*args, **kwargs)
        _record("rollout", t0, time.time())
        return out

    async def load_weights(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        out = await super().load_weights(*args, **kwargs)
        _record("rollout", t0, time.time())
        return out


class TimedReward(RuleReward):
    def score(self, batch: Any) -> Any:
        t0 = time.time()
        out = super().score(batch)
        _record("reward", t0, time.time())
        return out


def union_length(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of intervals clipped to [lo, hi]."""
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    total, cur_a, cur_b = 0.0, None, None
    for a, b in clipped:
        if cur_b is None or a > cur_b:
            if cur_b is not None and cur_a is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None and cur_a is not None:
        total += cur_b - cur_a
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[INTERVALS] = tmp
        here = "__main__"
        overrides = [
            f"roles.trainer._target_={here}.TimedTrainer",
            f"roles.rollout._target_={here}.TimedRollout",
            f"roles.reward._target_={here}.TimedReward",
            f"trainer.total_steps={args.steps}",
            "trainer.test_freq=-1",
            "trainer.save_freq=0",
            "trainer.val_before_train=false",
            "trainer.progress_bar=false",
            "trainer.logger=[jsonl]",
            f"trainer.output_dir={tmp}/run",
            *args.overrides,
        ]
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        # Ray workers inherit the environment variable through the runtime env of the local cluster.
        history = run(cfg)
        intervals = [tuple(json.loads(line)) for f in Path(tmp).glob("*.jsonl") for line in f.read_text().splitlines()]
        ends = sorted(b for _, b in intervals)
    # Steps are back to back; each step ends at the last interval before the next step's first generate.
    steps = history[1:]  # the first step pays warm-up (lazy imports, first allocations)
    step_times = [m["timing_s/step"] for m in steps]
    total = sum(m["timing_s/step"] for m in history)
    first_start = min(a for a, _ in intervals)
    busy = union_length([(a, b) for a, b in intervals], first_start, max(ends))
    wall = max(ends) - first_start
    print(f"steps: {len(history)}; median step {statistics.median(step_times):.3f}s")
    print("timing_s breakdown (median over steps after the first):")
    for key in sorted(k for k in steps[0] if k.startswith("timing_s/")):
        print(f"  {key:<28} {statistics.median(m[key] for m in steps):8.3f}s")
    print(f"sum of step times {total:.2f}s; wall from first to last role work {wall:.2f}s; roles busy {busy:.2f}s")
    overhead = max(total - busy, 0.0)
    print(f"framework overhead: {overhead:.2f}s = {100 * overhead / total:.1f}% of step time (target < 10%)")


if __name__ == "__main__":
    main()
