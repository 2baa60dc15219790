"""Benchmark generation through the rollout mesh against vLLM driven directly, and the mesh's routers on 2 engines.

    python scripts/bench_rollout.py                    # the tiny test model on CPU
    python scripts/bench_rollout.py --model PATH --device cuda

Prints median generated tokens/s and the ratios the issue targets: mesh / direct (at least 0.9) on one engine, and
the default router (power of two choices) against random on two engines with prompts of mixed lengths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlmesh.config import ModelConfig, RolloutConfig, SamplingConfig  # noqa: E402


def workload(count: int, vocab: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """`count` prompts of random non-special token ids (3 and up), with lengths drawn from [min_len, max_len]."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def engine_config(args: argparse.Namespace) -> RolloutConfig:
    kv = args.kv_cache_gb if args.device == "cpu" else None
    return RolloutConfig(
        dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, kv_cache_memory_gb=kv
    )


class DirectEngine:
    """One AsyncLLM in this process with the settings a rollout actor gives its engine: no actor in between."""

    def __init__(self, args: argparse.Namespace) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from rlmesh.roles.rollout.vllm import engine_settings

        self.args = args
        self.loop = asyncio.new_event_loop()
        settings = engine_settings(engine_config(args), ModelConfig(path=args.model), seed=0, device=args.device)

        async def start() -> Any:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**settings))

        self.engine = self.loop.run_until_complete(start())

    def tokens_per_s(self, prompts: list[list[int]], sampling: SamplingConfig) -> float:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        async def one(index: int, prompt: list[int]) -> int:
            params = SamplingParams(
                n=self.args.n,
                temperature=sampling.temperature,
                max_tokens=sampling.max_tokens,
                seed=index,
                logprobs=0,
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            final = None
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt), params, uuid.uuid4().hex):
                final = out
            assert final is not None
            return sum(len(c.token_ids) for c in final.outputs)

        async def run() -> int:
            return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

        started = time.perf_counter()
        tokens = self.loop.run_until_complete(run())
        return tokens / (time.perf_counter() - started)

    def close(self) -> None:
        engine, self.engine = self.engine, None
        engine.shutdown()
        del engine  # collected now, not at interpreter exit where vLLM's __del__ fails noisily


def start_mesh(args: argparse.Namespace, engines: int, router: str, cpus: float = 2) -> Any:
    from rlmesh.mesh import ActorMesh
    from rlmesh.roles.rollout.vllm import VLLMRollout

    resources: dict[str, float] = {"CPU": cpus}  # Ray sets the engine's OMP_NUM_THREADS from it
    if args.device == "cuda":
        resources["GPU"] = 1
    return ActorMesh(
        VLLMRollout,
        engines,
        args=(engine_config(args), ModelConfig(path=args.model)),
        kwargs={"seed": 0, "device": args.device},
        resources=resources,
        name=f"rollout-{router}-{engines}",
        router=router,
        distributed_env=False,
    )


def mesh_tokens_per_s(rollout: Any, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> float:
    """The requests as concurrent `generate.choose` calls, each routed by the mesh."""
    started = time.perf_counter()
    futures = [rollout.generate.choose(p, n, sampling, i) for i, p in enumerate(prompts)]
    tokens = sum(len(s.response_ids) for f in futures for s in f.result(timeout=3600))
    return tokens / (time.perf_counter() - started)


def alternate(runs: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Run each setup in turn, `repeats` + 1 rounds, dropping the first (warm-up): load on a shared machine drifts,
    and alternating spreads that drift over every setup alike."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            rate = run()
            if round_ > 0:
                rates[name].append(rate)
    return rates


def tiny_model() -> str:
    """The tiny test architecture with a 250-character vocabulary: a random model then rarely samples its eos, so
    responses run to max_tokens and every run does the same, large amount of work."""
    from rlmesh.models.tiny import build_char_tokenizer, build_tiny_qwen2, save_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="bench-rollout-tiny-"))
    tokenizer = build_char_tokenizer("".join(chr(0x100 + i) for i in range(250)))
    save_tiny_model(build_tiny_qwen2(tokenizer, seed=0, num_hidden_layers=2), tokenizer, folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a Hugging Face folder; default: the tiny test model")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-gb", type=float, default=0.25, help="CPU KV cache size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-routers", action="store_true", help="only the mesh-against-direct comparison")
    args = parser.parse_args()
    args.model = args.model or tiny_model()
    vocab = int(json.loads((Path(args.model) / "config.json").read_text())["vocab_size"])
    sampling = SamplingConfig(temperature=1.0, max_tokens=args.max_tokens)
    longest_prompt = args.max_model_len - args.max_tokens
    uniform = workload(args.prompts, vocab, 8, min(24, longest_prompt), seed=0)
    mixed = workload(args.prompts, vocab, 4, longest_prompt, seed=1)

    import ray

    from rlmesh.roles.rollout.vllm import close_engines

    ray.init(
        num_cpus=16,  # logical: four engines are alive at once in the router comparison, taking turns on the cores
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}},
    )
    header = (
        f"{args.prompts} prompts x {args.n} samples x up to {args.max_tokens} tokens, {args.device}, "
        f"median of {args.repeats} alternating runs"
    )
    direct = DirectEngine(args)
    one_engine = start_mesh(args, 1, "power_of_two")  # 2 CPUs, as the default recipe gives its engine
    try:
        first = alternate(
            {
                "vLLM AsyncLLM in this process": lambda: direct.tokens_per_s(uniform, sampling),
                "rollout mesh, 1 engine, choose per prompt": lambda: mesh_tokens_per_s(
                    one_engine, uniform, args.n, sampling
                ),
            },
            args.repeats,
        )
    finally:
        direct.close()
        close_engines(one_engine)
    report(header, first)
    direct_rate, mesh_rate = (statistics.median(rates) for rates in first.values())
    print(f"mesh / direct (target >= 0.9): {mesh_rate / direct_rate:.3f}")

    if not args.skip_routers:
        # One CPU per engine: each engine's threads get a core of their own (see _bind_cpu_threads).
        meshes = {router: start_mesh(args, 2, router, cpus=1) for router in ("power_of_two", "random")}
        try:
            second = alternate(
                {
                    f"2 engines, prompts of {4}-{longest_prompt} tokens, {router}": (
                        lambda mesh=mesh: mesh_tokens_per_s(mesh, mixed, args.n, sampling)
                    )
                    for router, mesh in meshes.items()
                },
                args.repeats,
            )
        finally:
            for mesh in meshes.values():
                close_engines(mesh)
        report(header, second)
        p2c, rnd = (statistics.median(rates) for rates in second.values())
        print(f"power_of_two / random: {p2c / rnd:.3f}")
    ray.shutdown()


def report(header: str, rates: dict[str, list[float]]) -> None:
    print(f"\n{header}")
    width = max(len(name) for name in rates)
    print(f"{'setup'.ljust(width)} | tokens/s | runs")
    for name, runs in rates.items():
        print(f"{name.ljust(width)} | {statistics.median(runs):8.0f} | {', '.join(f'{r:.0f}' for r in runs)}")


if __name__ == "__main__":
    main()
