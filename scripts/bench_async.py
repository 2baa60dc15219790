"""Synchronous, one-step-off and asynchronous training side by side on a long-tailed workload, from one run.

Every system trains the same number of steps (so the same number of samples) of the embedded default, with the
response cap raised and sampling hotter, so that most responses stop after a few tokens and a few run on to the cap:
in sync mode every step waits for its slowest sample, while one_step_off and async generate the next steps' samples
while the trainer trains (async also lets a weight sync land on requests in flight).

    python scripts/bench_async.py                       # 30 steps each of sync, one_step_off, async K=1, async K=2
    python scripts/bench_async.py --steps 50 --only sync,async1 roles.rollout.sampling.max_tokens=96

Prints, per system: the wall time of its steps (start-up excluded), its ratio to sync, the median trainer idle ratio
(the fraction of a step spent waiting on generation), the response-length tail, and the mean training reward over
the last 10 steps (the reward curves should agree within noise: one step's score averages 512 samples).
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_step import rlmesh_run

SYSTEMS = {
    "sync": ["trainer.mode=sync"],
    "one_step_off": ["trainer.mode=one_step_off"],
    "async1": ["trainer.mode=async", "trainer.asynchronous.max_staleness=1"],
    "async2": ["trainer.mode=async", "trainer.asynchronous.max_staleness=2"],
}
# The tiny model usually answers in 3-6 tokens then stops; at temperature 2.0 some samples miss the stop and run on
# (measured: mean 3.7 tokens, the longest 30 of the 64 allowed), so each step's generation waits on its longest
# samples. A milder tail than a reasoning model's: none reached the cap.
LONG_TAIL = [
    "roles.rollout.sampling.max_tokens=64",
    "roles.rollout.sampling.temperature=2.0",
    "roles.rollout.max_model_len=96",
]


def summary(history: list[dict[str, float]]) -> dict[str, float]:
    last = history[-10:]
    return {
        "wall": sum(m["timing_s/step"] for m in history),
        "idle": statistics.median(m["trainer/idle_ratio"] for m in history),
        "length_mean": statistics.mean(m["response_length/mean"] for m in history),
        "length_max": max(m["response_length/max"] for m in history),
        "clipped": statistics.mean(m["response_length/clip_ratio"] for m in history),
        "reward": statistics.mean(m["critic/score/mean"] for m in last),
        "staleness": max(m["rollout/staleness/max"] for m in history),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every system, after the long-tail ones")
    args = parser.parse_args()
    chosen = [s for s in args.only.split(",") if s]
    if unknown := set(chosen) - set(SYSTEMS):
        parser.error(f"--only: unknown system(s) {sorted(unknown)}; choose from {list(SYSTEMS)}")
    results: dict[str, dict[str, float]] = {}
    for system in chosen:
        started = time.perf_counter()
        history = rlmesh_run([*LONG_TAIL, *SYSTEMS[system], *args.overrides], args.steps)
        results[system] = summary(history)
        print(f"{system}: {args.steps} steps in {time.perf_counter() - started:.1f}s (with start-up)", flush=True)
    base = results.get("sync", {}).get("wall")
    print(f"\n{args.steps} steps each, 512 samples a step; wall = the steps' own time (s)")
    header = f"{'system':<14}{'wall':>8}{'/ sync':>8}{'idle':>7}{'len mean':>10}{'len max':>9}{'at cap':>8}"
    print(header + f"{'stale':>7}{'reward':>9}")
    for system, m in results.items():
        ratio = f"{m['wall'] / base:.2f}x" if base else "-"
        row = (
            f"{system:<14}{m['wall']:>8.1f}{ratio:>8}{m['idle']:>7.2f}{m['length_mean']:>10.1f}{m['length_max']:>9.0f}"
        )
        print(row + f"{m['clipped']:>8.3f}{m['staleness']:>7.0f}{m['reward']:>9.3f}")


if __name__ == "__main__":
    main()
