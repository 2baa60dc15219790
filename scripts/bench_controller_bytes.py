"""Bytes that pass through the controller per training step, by role call, from the real loop.

Two shapes, each run for real through `rlmesh.train.run` with the mesh verbs instrumented:
- the embedded default (`recipe=grpo`: 32 prompts x 16 samples, vLLM, the tiny model);
- a grpo_gsm8k-shaped batch: 512 prompts x 8 samples x 1,024 response tokens, with synthetic roles (their outputs
  have the real roles' fields, shapes and dtypes; nothing is computed), so it runs on a CPU machine.

"Out" is what the controller serializes into calls (arguments), "in" what it deserializes from results, both
measured as Ray pickles them (protocol 5, out-of-band buffers counted). The step's data stays in the object store
(StoredRows): what the controller handles is references, per-sample scalars and metrics. Calls to the store worker
(the whole-batch stages) are counted as `store_worker.<function>`. Run: python scripts/bench_controller_bytes.py
"""

from __future__ import annotations

import argparse
import pickle
import random
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rlmesh.data import Batch
from rlmesh.mesh import endpoint
from rlmesh.mesh.futures import GatheredFuture, RoutedFuture
from rlmesh.mesh.mesh import ActorMesh
from rlmesh.roles.rollout.base import Sample


def serialized_bytes(value: Any) -> int:
    """The bytes Ray moves for `value`: the pickle plus its out-of-band buffers."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return len(data) + sum(buffer.raw().nbytes for buffer in buffers)


@contextmanager
def count_controller_bytes() -> Iterator[dict[str, list[int]]]:
    """(role.endpoint -> [bytes out, bytes in]) for every mesh call made while the block runs."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    originals = {name: getattr(ActorMesh, name) for name in ("_call_all", "_call_one", "_call_sharded")}
    routed = ActorMesh._call_routed

    def counting(name: str) -> Any:
        def call(self: ActorMesh[Any], spec: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            key = f"{self.name}.{spec.name}"
            # Every mesh measured here has one actor per role, so one copy of the arguments goes out.
            counts[key][0] += serialized_bytes((args, kwargs))
            future = originals[name](self, spec, args, kwargs)
            future._bench_key = key
            return future

        return call

    def counting_routed(
        self: ActorMesh[Any], spec: Any, args: tuple[Any, ...], kwargs: dict[str, Any], key: Any
    ) -> Any:
        name = f"{self.name}.{spec.name}"
        counts[name][0] += serialized_bytes((args, kwargs))
        future = routed(self, spec, args, kwargs, key)
        future._bench_key = name
        return future

    results = {cls: cls.result for cls in (GatheredFuture, RoutedFuture)}

    def counting_result(cls: type) -> Any:
        def result(self: Any, timeout: float | None = None) -> Any:
            fresh = not getattr(self, "_bench_counted", False)
            value = results[cls](self, timeout)
            if fresh and hasattr(self, "_bench_key"):
                counts[self._bench_key][1] += serialized_bytes(value)
                self._bench_counted = True
            return value

        return result

    import rlmesh.loop
    import rlmesh.sampling

    run_stored = rlmesh.loop.run_stored

    def counting_run_stored(fn: Any, *args: Any, **kwargs: Any) -> Any:
        name = f"store_worker.{fn.__name__}"
        counts[name][0] += serialized_bytes((fn, args, kwargs))
        future = run_stored(fn, *args, **kwargs)
        future._bench_key = name
        return future

    rlmesh.loop.run_stored = counting_run_stored  # type: ignore[assignment]
    rlmesh.sampling.run_stored = counting_run_stored  # type: ignore[assignment]
    for name in originals:
        setattr(ActorMesh, name, counting(name))
    ActorMesh._call_routed = counting_routed  # type: ignore[method-assign]
    for cls in results:
        cls.result = counting_result(cls)  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(ActorMesh, name, fn)
        ActorMesh._call_routed = routed  # type: ignore[method-assign]
        rlmesh.loop.run_stored = run_stored  # type: ignore[assignment]
        rlmesh.sampling.run_stored = run_stored  # type: ignore[assignment]
        for cls, fn in results.items():
            cls.result = fn  # type: ignore[method-assign]


# ---------------------------------------------------------------- synthetic roles at the gsm8k shape


class SyntheticRollout:
    """Responses of exactly max_tokens random tokens, with log-probs: what an engine returns, without the engine."""

    def __init__(self, config: Any, model: Any, *, seed: int, device: str) -> None:
        self.vocab = 150_000
        self.version = 0

    @endpoint
    def generate(self, prompt_ids: list[int], n: int, sampling: Any = None, seed: int | None = None) -> list[Sample]:
        rng = random.Random(seed)
        length = int(sampling.max_tokens)
        return [
            Sample(
                list(prompt_ids),
                [rng.randrange(self.vocab) for _ in range(length)],
                [-rng.random() for _ in range(length)],
                self.version,
                "length",
            )
            for _ in range(n)
        ]

    @endpoint
    def load_weights(self, weights: Any, version: int) -> None:
        self.version = version

    @endpoint
    def weight_version(self) -> int:
        return self.version


def _like_response(batch: Batch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(batch["response_mask"].shape, dtype=dtype)


class SyntheticTrainer:
    """The policy trainer's endpoints with its outputs' fields and shapes (old_logprobs, entropy; metrics)."""

    weight_transports = ("object_store",)

    def __init__(self, config: Any, *, rollout_n: int, total_training_steps: int, seed: int, device: str) -> None:
        pass

    @endpoint
    def compute_logprobs(self, batch: Batch) -> Batch:
        return Batch({"old_logprobs": _like_response(batch), "entropy": _like_response(batch)})

    @endpoint(collect=lambda per_rank: per_rank[0])  # one rank here; the real trainer averages over ranks
    def update(self, batch: Batch) -> dict[str, float]:
        return {"actor/pg_loss": 0.0, "actor/grad_norm": 1.0, "actor/entropy": 0.0, "actor/ppo_kl": 0.0}

    @endpoint
    def export_weights(self) -> dict[str, Any] | None:
        return {}

    @endpoint
    def save_checkpoint(self, path: str) -> None:
        pass

    @endpoint
    def load_checkpoint(self, path: str) -> None:
        pass


class SyntheticReference:
    def __init__(self, config: Any, model: Any, *, device: str) -> None:
        pass

    @endpoint
    def compute_ref_logprobs(self, batch: Batch) -> Batch:
        return Batch({"ref_logprobs": _like_response(batch)})


class SyntheticScorer:
    needs_gpu = False

    def __init__(self, config: Any, *, tokenizer_path: str, max_response_length: int) -> None:
        pass

    @endpoint
    def score(self, batch: Batch) -> Batch:
        scores = _like_response(batch)
        scores[:, -1] = torch.randint(0, 2, (len(batch),)).float()
        out = Batch({"token_level_scores": scores}, size=len(batch))
        out["score"] = scores[:, -1].tolist()
        out["reward_failure"] = [None] * len(batch)
        return out


def synthetic_roles(output_dir: str) -> list[str]:
    """The default recipe with every role synthetic (the shapes of their outputs, nothing computed), grpo_gsm8k's
    reference and recomputed old log-probs, and no validation, checkpoints or plots."""
    here = "scripts.bench_controller_bytes"
    return [
        "recipe=grpo",
        f"trainer.output_dir={output_dir}",
        f"roles.rollout._target_={here}.SyntheticRollout",
        f"roles.trainer._target_={here}.SyntheticTrainer",
        f"roles.reference._target_={here}.SyntheticReference",
        f"roles.reward._target_={here}.SyntheticScorer",
        "roles.trainer.ppo_micro_batch_size_per_device=8",
        "roles.trainer.use_kl_loss=true",  # grpo_gsm8k trains with a KL loss, so a reference scores every batch
        "algorithm.recompute_old_logprobs=true",
        "trainer.test_freq=-1",
        "trainer.save_freq=0",
        "trainer.val_before_train=false",
        "trainer.progress_bar=false",
        "trainer.plot=false",
        "trainer.logger=[jsonl]",
    ]


def gsm8k_shaped(output_dir: str) -> list[str]:
    return [
        *synthetic_roles(output_dir),
        "data.train_batch_size=512",
        "roles.rollout.n=8",
        "roles.rollout.sampling.max_tokens=1024",
        "roles.trainer.ppo_mini_batch_size=128",
    ]


def measure(overrides: list[str], steps: int) -> dict[str, list[int]]:
    from hydra import compose, initialize_config_dir

    import rlmesh.train

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"trainer.total_steps={steps}"])
    with count_controller_bytes() as counts:
        rlmesh.train.run(cfg)
    return {key: [value[0] // steps, value[1] // steps] for key, value in counts.items()}


def report(title: str, counts: dict[str, list[int]]) -> None:
    out, into = sum(v[0] for v in counts.values()), sum(v[1] for v in counts.values())
    print(
        f"\n{title}: {(out + into) / 1e6:,.3f} MB through the controller per step ({out / 1e6:,.3f} out, "
        f"{into / 1e6:,.3f} in)"
    )
    print(f"{'call':36} {'out MB':>10} {'in MB':>10}")
    for key, (sent, received) in sorted(counts.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        print(f"{key:36} {sent / 1e6:10.3f} {received / 1e6:10.3f}")


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the synthetic roles import as scripts.<this module>
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as default_dir, tempfile.TemporaryDirectory() as big_dir:
        default = measure(
            [
                "recipe=grpo",
                f"trainer.output_dir={default_dir}",
                "trainer.test_freq=-1",
                "trainer.save_freq=0",
                "trainer.val_before_train=false",
                "trainer.progress_bar=false",
                "trainer.plot=false",
            ],
            args.steps,
        )
        report("default (32 prompts x 16 samples)", default)
        report("grpo_gsm8k-shaped (512 prompts x 8 samples x 1,024 tokens)", measure(gsm8k_shaped(big_dir), args.steps))


if __name__ == "__main__":
    main()
