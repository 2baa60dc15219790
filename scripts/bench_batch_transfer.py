"""Measure ray.put + ray.get of a ~256 MiB Batch against the same bytes as one raw numpy array."""

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

from rlmesh.data import Batch


def build_batch(num_samples: int, response_length: int) -> Batch:
    """response_ids (int64) + old_logprobs and advantages (float32): 16 bytes per token, 256 MiB at 4096 x 4096."""
    shape = (num_samples, response_length)
    return Batch(
        {
            "response_ids": torch.randint(0, 32_000, shape),
            "old_logprobs": torch.randn(shape),
            "advantages": torch.randn(shape),
        },
        {"data_source": ["gsm8k"] * num_samples, "uid": [f"uid-{i // 8}" for i in range(num_samples)]},
        {"global_step": 1},
    )


def median_ms_interleaved(round_trips: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median time of each round trip, run in turns so that all of them see the same object-store state."""
    for round_trip in round_trips.values():
        round_trip()  # warm-up: the first puts fault in the object store's pages
    times: dict[str, list[float]] = {name: [] for name in round_trips}
    for _ in range(repeats):
        for name, round_trip in round_trips.items():
            start = time.perf_counter()
            round_trip()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) * 1e3 for name, samples in times.items()}


def put_get(value: Any) -> Callable[[], Any]:
    def round_trip() -> Any:
        ref = ray.put(value)
        result = ray.get(ref)
        del ref
        return result

    return round_trip


@ray.remote
def count_rows(batch: Any) -> int:
    return len(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num_samples", type=int, default=4096)
    parser.add_argument("--response_length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    batch = build_batch(args.num_samples, args.response_length)
    num_bytes = sum(
        batch[key].numel() * batch[key].element_size() for key in ("response_ids", "old_logprobs", "advantages")
    )
    raw = np.random.randint(0, 255, size=num_bytes, dtype=np.uint8)
    # The same tensors pickled by torch's own reducer (what a plain TensorDict gets), for comparison.
    plain_tensordict = batch.tensors

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        ms = median_ms_interleaved(
            {
                "numpy": put_get(raw),
                "batch": put_get(batch),
                "tensordict": put_get(plain_tensordict),
                "numpy_task": lambda: ray.get(count_rows.remote(raw)),
                "batch_task": lambda: ray.get(count_rows.remote(batch)),
            },
            args.repeats,
        )
    finally:
        ray.shutdown()

    print(f"payload: {num_bytes / 2**20:.0f} MiB, median of {args.repeats}")
    rows = [
        ("ray.put+get  numpy array", "numpy", "numpy"),
        ("ray.put+get  Batch", "batch", "numpy"),
        ("ray.put+get  plain TensorDict", "tensordict", "numpy"),
        ("task arg     numpy array", "numpy_task", "numpy_task"),
        ("task arg     Batch", "batch_task", "numpy_task"),
    ]
    for label, name, baseline in rows:
        print(f"{label:31s}{ms[name]:8.1f} ms   ratio to numpy {ms[name] / ms[baseline]:.2f}")


if __name__ == "__main__":
    main()
