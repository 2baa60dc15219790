"""Compare how a recipe learns with each rollout backend: the same runs with rollout=vllm and rollout=hf, per seed.

    python scripts/bench_learning.py                              # the default recipe, seeds 1 2 3
    python scripts/bench_learning.py --seeds 1 2 --steps 100 recipe=dapo

Each run is `python -m rlmesh.train` in its own process with the given overrides. Prints, per backend and seed, the
held-out greedy accuracy before training and at the end (the mean of the last three evaluations, which damps the
evaluation noise), the training score over the first and last 10 steps and the median step time; then the medians
over seeds and the ratios vllm / hf of the accuracy gain and of the step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCORE = "critic/score/mean"


def train(backend: str, seed: int, steps: int, test_freq: int, val_size: int, extra: list[str], out: Path) -> Path:
    run_dir = out / f"{backend}-seed{seed}"
    command = [
        sys.executable,
        "-m",
        "rlmesh.train",
        f"rollout={backend}",
        f"trainer.seed={seed}",
        f"trainer.total_steps={steps}",
        f"trainer.test_freq={test_freq}",
        f"data.val_size={val_size}",
        "trainer.val_before_train=true",  # "val before" below is this evaluation, whatever the recipe says
        "trainer.save_freq=0",
        "trainer.progress_bar=false",
        "trainer.logger=[jsonl]",
        f"trainer.output_dir={run_dir}",
        *extra,
    ]
    print(f"$ {' '.join(command[1:])}", flush=True)
    with open(out / f"{backend}-seed{seed}.log", "w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    return run_dir


def summarize(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_key = next(k for row in rows for k in row if k.startswith("val-core/") and "/acc/" in k)
    vals = [row[val_key] for row in rows if val_key in row]
    scores = [row[SCORE] for row in rows if SCORE in row]
    steps = [row["timing_s/step"] for row in rows if "timing_s/step" in row]
    return {
        "val before": vals[0],
        "val end": statistics.mean(vals[-3:]),
        "val gain": statistics.mean(vals[-3:]) - vals[0],
        "score 1-10": statistics.mean(scores[:10]),
        "score last 10": statistics.mean(scores[-10:]),
        "s/step": statistics.median(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--test-freq", type=int, default=50)
    parser.add_argument("--val-size", type=int, default=1000, help="held-out problems; 1000 gives SE about 1.5 points")
    parser.add_argument("--backends", nargs="+", default=["vllm", "hf"])
    parser.add_argument("--out", type=Path, default=None, help="where runs are written; default: a new temp folder")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to every run")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-learning-"))
    out.mkdir(parents=True, exist_ok=True)

    results: dict[str, list[dict[str, float]]] = {backend: [] for backend in args.backends}
    for seed in args.seeds:  # backends alternate within each seed, so machine-load drift hits both alike
        for backend in args.backends:
            run_dir = train(backend, seed, args.steps, args.test_freq, args.val_size, args.overrides, out)
            results[backend].append(summarize(run_dir))

    columns = list(next(iter(results.values()))[0])
    print(f"\n{args.steps} steps, overrides {args.overrides or '(none)'}, runs in {out}")
    print(" | ".join(["backend", "seed", *columns]))
    for backend, runs in results.items():
        for seed, summary in zip(args.seeds, runs, strict=True):
            print(" | ".join([backend, str(seed), *(f"{summary[c]:.3f}" for c in columns)]))
    medians = {b: {c: statistics.median(r[c] for r in runs) for c in columns} for b, runs in results.items()}
    for backend, summary in medians.items():
        print(" | ".join([backend, "median", *(f"{summary[c]:.3f}" for c in columns)]))
    if {"vllm", "hf"} <= medians.keys():
        vllm, hf = medians["vllm"], medians["hf"]
        print(f"vllm / hf held-out accuracy gain: {vllm['val gain'] / hf['val gain']:.2f}")
        print(f"vllm / hf median step time: {vllm['s/step'] / hf['s/step']:.2f}")


if __name__ == "__main__":
    main()
