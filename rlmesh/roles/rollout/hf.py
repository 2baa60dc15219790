"""The transformers rollout backend (rollout=hf): seeded sampling with a KV cache, concurrent calls batched together."""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import hashlib
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from rlmesh.config import ModelConfig, RolloutConfig, SamplingConfig
from rlmesh.engine.devices import resolve_device, resolve_dtype
from rlmesh.mesh import endpoint
from rlmesh.roles.rollout.base import BusyClock, Sample

# How long the scheduler, woken from idle, waits for more concurrent requests before starting a batch. The loop sends
# one `choose` per prompt; Ray delivers pipelined calls about 0.3 ms apart (DESIGN.md), so a few ms gathers a burst.
GATHER_WINDOW_S = 0.005


def as_sampling_config(sampling: SamplingConfig | Mapping[str, Any]) -> SamplingConfig:
    """A SamplingConfig from itself, a dict or an OmegaConf DictConfig (what Hydra hands the roles)."""
    if isinstance(sampling, SamplingConfig):
        return sampling
    if isinstance(sampling, Mapping) or hasattr(sampling, "keys"):
        values = {str(key): sampling[key] for key in sampling.keys()}  # noqa: SIM118 - DictConfig is not a Mapping
        known = {f.name for f in dataclasses.fields(SamplingConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"sampling has unknown keys {unknown}; the known keys are {sorted(known)}")
        for key in ("stop", "stop_token_ids"):
            if key in values:
                values[key] = list(values[key])
        return SamplingConfig(**values)
    raise TypeError(f"sampling must be a SamplingConfig or a mapping of its fields, got {type(sampling).__name__}")


class SamplingError(ValueError):
    """A sampling setting that cannot be sampled: `field` names it, `why` says what it must be."""

    def __init__(self, field: str, why: str, value: object) -> None:
        super().__init__(f"sampling.{field} {why}, got {value}")
        self.field, self.why = field, why


def check_sampling(sampling: SamplingConfig) -> None:
    """Raises SamplingError naming the field, the value and the fix for settings that cannot be sampled."""
    if not sampling.temperature >= 0:
        raise SamplingError("temperature", "must be >= 0 (0 = greedy)", sampling.temperature)
    if not 0 < sampling.top_p <= 1:
        raise SamplingError("top_p", "must be in (0, 1] (1 disables it)", sampling.top_p)
    if sampling.top_k < -1:
        raise SamplingError("top_k", "must be -1 or 0 (disabled) or a positive count", sampling.top_k)
    if sampling.max_tokens < 1:
        raise SamplingError("max_tokens", "must be at least 1", sampling.max_tokens)
    if not 0 <= sampling.min_tokens <= sampling.max_tokens:
        raise SamplingError("min_tokens", f"must be in [0, max_tokens={sampling.max_tokens}]", sampling.min_tokens)


def sample_seed(request_seed: int, sample_index: int) -> int:
    """The generator seed of one sample of a request: sample i is the same whatever n is and wherever it runs."""
    digest = hashlib.blake2b(f"{request_seed}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def sampling_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """The logits of the sampling distribution, vLLM's order: divide by temperature, keep the top_k largest, then keep
    the nucleus (the largest tokens whose probabilities, before each one, sum to < top_p); the rest become -inf.

    logits [B, V] float32; temperature [B] (> 0); top_k [B] long (<= 0 or >= V: off); top_p [B] (1: off). Ties at
    the k-th logit are kept. log_softmax of the result is the sampling log-probability of every token.
    """
    scaled = logits / temperature[:, None]
    vocab = scaled.shape[-1]
    use_top_k = (top_k > 0) & (top_k < vocab)
    use_top_p = top_p < 1
    if not bool(use_top_k.any() or use_top_p.any()):
        return scaled
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    if bool(use_top_k.any()):
        kth_position = (top_k.clamp(1, vocab) - 1)[:, None]
        kth_logit = sorted_logits.gather(-1, kth_position)
        drop = use_top_k[:, None] & (sorted_logits < kth_logit)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if bool(use_top_p.any()):
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # The most likely token has no mass before it, so it always stays.
        drop = use_top_p[:, None] & (mass_before >= top_p[:, None])
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, order, sorted_logits)


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [B, V]: the first token whose cumulative probability exceeds u * total, u in [0, 1).

    Batched on any device with one uniform per row, so per-row seeding costs a Python float, not a kernel launch per
    row (torch.multinomial with a generator each made a 256-row GPU batch several times slower). The cumulative sum
    is float64, so a 150k-token vocabulary loses no mass to rounding. A token of probability 0 is never drawn.
    """
    cumulative = probs.to(torch.float64).cumsum(dim=-1)
    targets = uniforms.to(cumulative.device)[:, None] * cumulative[:, -1:]
    drawn = torch.searchsorted(cumulative, targets, right=True).squeeze(-1)
    # u * total can round up to total itself; the last token with mass is then the one meant.
    last_with_mass = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)
    return torch.minimum(drawn, last_with_mass)


@dataclass
class _Request:
    """One generate call: its validated settings, the samples finished so far and the future its caller awaits."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    stop_token_ids: frozenset[int]
    max_new_tokens: int
    samples: list[Sample | None]
    future: asyncio.Future[list[Sample]]
    remaining: int


@dataclass
class _Row:
    """One sequence being generated: sample `index` of `request`, drawing from its own generator."""

    request: _Request
    index: int
    rng: random.Random
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    weight_version: int = -1


class HFRollout:
    """Generates with a transformers causal LM, token by token with a KV cache, on CPU or one GPU.

    Seeding: each sample draws its uniforms from its own generator, seeded from (request seed, sample index), so a
    seeded request gives the same tokens alone or batched with others, and sample i is the same whatever n is. The
    request seed is the `seed` argument, else `sampling.seed`, else drawn from this actor's seeded stream (which
    reproduces only for the same calls in the same order to the same actor: the loop should pass
    sampling_seed(run seed, step, prompt index)).

    Batching: concurrent generate calls queue; a scheduler task takes up to config.generation_batch_size sequences at
    a time and runs each batch to completion in a worker thread (static batching: a call arriving mid-batch waits for
    the next one). Weights change only between batches, so every sample of a batch carries one weight version.

    Bitwise reproducibility: batched float math is not batch-invariant (measured on CPU: logits differ by ~2e-6
    between a row alone and in a batch of 8; left padding and GEMM shapes change the rounding). With
    batch_across_requests=True (the default) rollout log-probs can therefore differ in the 6th digit with what was
    batched alongside, and a token flips only if a uniform lands that close to a boundary. With False, a batch holds
    the samples of one request only, so results are bitwise reproducible whatever the concurrency; it costs
    throughput when n is small (measured: 1.3x at n=16, 6.5x at n=4 on the 2-core CPU).
    """

    weight_transports = ("object_store",)  # a full state dict through Ray's object store (load_weights)

    def __init__(
        self,
        config: RolloutConfig,
        model: ModelConfig,
        *,
        seed: int,
        device: str = "auto",
        batch_across_requests: bool = True,
    ) -> None:
        if config.generation_batch_size < 1:
            raise ValueError(
                f"rollout.generation_batch_size must be at least 1 sequence, got {config.generation_batch_size}"
            )
        self.config = config
        self.default_sampling = as_sampling_config(config.sampling)
        check_sampling(self.default_sampling)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(config.dtype, model.dtype, device=self.device)
        self.batch_across_requests = batch_across_requests
        self.tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model.path,
            use_safetensors=True,  # never a pickled .bin: unpickling a downloaded file can run its code
            dtype=self.dtype,
            attn_implementation=model.attn_implementation,
            trust_remote_code=model.trust_remote_code,
        )
        torch.nn.Module.to(self.model, self.device)  # PreTrainedModel.to has a wrapper type mypy cannot call
        self.model.eval().requires_grad_(False)
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])  # type: ignore[index]
        self.max_model_len = int(config.max_model_len or self.model.config.get_text_config().max_position_embeddings)
        self.eos_token_ids = self._eos_token_ids()
        self._seed_stream = random.Random(seed)
        self._weight_version = 0
        self._parameter_shapes = {name: tuple(p.shape) for name, p in self.model.state_dict().items()}
        # Held by whatever runs the model (a batch, a weight load, a log-prob query): weights never change mid-batch.
        self._model_lock = threading.Lock()
        self._pending: deque[_Row] = deque()
        self._scheduler: asyncio.Task[None] | None = None
        self.generated_tokens = 0
        self.generation_seconds = 0.0
        self._busy = BusyClock()

    def _eos_token_ids(self) -> frozenset[int]:
        """The tokenizer's eos and generation_config's eos ids (vLLM stops on both)."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        generation_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(generation_eos, int):
            ids.add(generation_eos)
        elif generation_eos is not None:
            ids.update(int(token) for token in generation_eos)
        return frozenset(ids)

    # ------------------------------------------------------------------------------------------------ endpoints

    @endpoint
    async def generate(
        self,
        prompt_ids: list[int],
        n: int,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
    ) -> list[Sample]:
        """`n` samples of one prompt. Greedy (temperature 0) log-probs are those of the raw distribution at
        temperature 1; sampled ones are under the sampling distribution (after temperature, top-k, top-p)."""
        request = self._new_request(prompt_ids, n, sampling)
        request_seed = seed if seed is not None else request.sampling.seed
        if request_seed is None:
            request_seed = self._seed_stream.getrandbits(63)
        for index in range(n):
            self._pending.append(_Row(request, index, random.Random(sample_seed(request_seed, index))))
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule())
        with self._busy.request():
            return await request.future

    @endpoint
    async def load_weights(self, weights: Mapping[str, torch.Tensor], version: int) -> None:
        """Copies Hugging Face-named tensors into the model in place, between batches, and sets the weight version.

        Every name must be one of the model's state_dict names and every shape must match, else nothing is loaded and
        ValueError says which; dtypes are converted. A subset of the weights (one bucket) is allowed, an empty dict
        is not: a sync that silently changes nothing must be impossible.
        """
        with self._busy.paused():  # batches wait for the model lock meanwhile
            await asyncio.to_thread(self._load_weights, weights, version)

    def trace_args(self) -> dict[str, int]:
        """Added to the trace span of each call: the weights the rollout serves when it begins."""
        return {"weight_version": self._weight_version}

    @endpoint
    async def weight_version(self) -> int:
        """The version of the weights the next batch generates with (0 until the first load_weights)."""
        return self._weight_version

    @endpoint
    async def compute_logprobs_of(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """log p(response token | prompt, earlier response tokens) at temperature 1 under the current weights."""
        prompt, response = [int(token) for token in prompt_ids], [int(token) for token in response_ids]
        self._check_token_ids("prompt_ids", prompt)
        self._check_token_ids("response_ids", response)
        return await asyncio.to_thread(self._logprobs_of, prompt, response)

    @endpoint
    async def busy_time(self) -> dict[str, float]:
        """Seconds with a request waiting or generating, outside weight loads, and seconds alive (BusyClock)."""
        return self._busy.reading()

    @endpoint
    async def generation_stats(self) -> dict[str, float]:
        """Tokens generated and seconds spent inside batches since the actor started (tokens/s = the ratio)."""
        return {"generated_tokens": float(self.generated_tokens), "generation_seconds": self.generation_seconds}

    # -------------------------------------------------------------------------------------------- validation

    def _check_token_ids(self, what: str, ids: Sequence[int]) -> None:
        bad = [token for token in ids if not 0 <= token < self.vocab_size]
        if bad:
            raise ValueError(f"{what} holds ids outside the vocabulary [0, {self.vocab_size}): {bad[:10]}")

    def _new_request(self, prompt_ids: Sequence[int], n: int, sampling: SamplingConfig | None) -> _Request:
        if not prompt_ids:
            raise ValueError("generate needs a non-empty prompt_ids; every prompt needs at least one token")
        prompt = [int(token) for token in prompt_ids]
        self._check_token_ids("prompt_ids", prompt)
        if n < 1:
            raise ValueError(f"generate needs n >= 1 samples, got {n}")
        resolved = self.default_sampling if sampling is None else as_sampling_config(sampling)
        check_sampling(resolved)
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens, which leaves no room under max_model_len={self.max_model_len}; "
                "shorten the prompt (data.max_prompt_length) or raise rollout.max_model_len"
            )
        loop = asyncio.get_running_loop()
        return _Request(
            prompt_ids=prompt,
            sampling=resolved,
            stop_token_ids=self.eos_token_ids | {int(token) for token in resolved.stop_token_ids},
            max_new_tokens=min(resolved.max_tokens, room),
            samples=[None] * n,
            future=loop.create_future(),
            remaining=n,
        )

    # --------------------------------------------------------------------------------------------- scheduling

    async def _schedule(self) -> None:
        await asyncio.sleep(GATHER_WINDOW_S)
        while self._pending:
            batch = self._next_batch()
            if not batch:
                continue
            try:
                await asyncio.to_thread(self._run_batch, batch)
            except Exception as error:
                self._fail({id(row.request): row.request for row in batch}.values(), error)
                continue
            for row in batch:
                self._finish_row(row)

    def _next_batch(self) -> list[_Row]:
        """Up to generation_batch_size queued rows in arrival order; one request's rows only when not batching
        across requests. Rows of requests whose caller has gone (cancelled, failed) are dropped."""
        batch: list[_Row] = []
        while self._pending and len(batch) < self.config.generation_batch_size:
            row = self._pending[0]
            if row.request.future.done():
                self._pending.popleft()
                continue
            if batch and not self.batch_across_requests and row.request is not batch[0].request:
                break
            batch.append(self._pending.popleft())
        return batch

    def _finish_row(self, row: _Row) -> None:
        request = row.request
        request.samples[row.index] = Sample(
            prompt_ids=list(request.prompt_ids),
            response_ids=row.response_ids,
            logprobs=row.logprobs,
            weight_version=row.weight_version,
            finish_reason=row.finish_reason,
        )
        request.remaining -= 1
        if request.remaining == 0 and not request.future.done():
            request.future.set_result([sample for sample in request.samples if sample is not None])

    def _fail(self, requests: Iterable[_Request], error: BaseException) -> None:
        failed = list(requests)
        for request in failed:
            if not request.future.done():
                request.future.set_exception(error)
        gone = {id(request) for request in failed}
        self._pending = deque(row for row in self._pending if id(row.request) not in gone)

    # ------------------------------------------------------------------------------------------ model work

    @torch.inference_mode()
    def _run_batch(self, rows: list[_Row]) -> None:
        """Generates every row to its end (stop token, stop string, max_new_tokens), filling it in place."""
        with self._model_lock:
            started = time.perf_counter()
            version = self._weight_version
            for row in rows:
                row.weight_version = version
            self._decode(rows)
            self.generation_seconds += time.perf_counter() - started
            self.generated_tokens += sum(len(row.response_ids) for row in rows)

    def _decode(self, rows: list[_Row]) -> None:
        device = self.device
        cache = DynamicCache(config=self.model.config)
        prompts = [row.request.prompt_ids for row in rows]
        if all(prompt == prompts[0] for prompt in prompts):
            # One prompt (the n samples of one request): prefill it once and copy its cache to every row.
            input_ids = torch.tensor([prompts[0]], device=device)
            attention_mask = torch.ones_like(input_ids)
            positions = torch.arange(len(prompts[0]), device=device)[None]
            logits = self._forward(input_ids, attention_mask, positions, cache)
            cache.batch_repeat_interleave(len(rows))
            logits = logits.expand(len(rows), -1)
            attention_mask = attention_mask.expand(len(rows), -1)
            positions = positions.expand(len(rows), -1)
        else:
            width = max(len(prompt) for prompt in prompts)
            input_ids = torch.full((len(rows), width), self._pad_token_id(), dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for slot, prompt in enumerate(prompts):
                input_ids[slot, width - len(prompt) :] = torch.tensor(prompt)
                attention_mask[slot, width - len(prompt) :] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = self._forward(input_ids, attention_mask, positions, cache)
        next_positions = positions[:, -1] + 1
        active = list(rows)
        settings = self._row_settings(active)
        holds_stops = any(row.request.sampling.min_tokens for row in rows)
        while True:
            if holds_stops:
                logits = self._mask_early_stops(logits, active)
            tokens, logprobs = self._choose_tokens(logits, active, *settings)
            still_active: list[int] = []
            for slot, (row, token, logprob) in enumerate(zip(active, tokens, logprobs, strict=True)):
                row.response_ids.append(token)
                row.logprobs.append(logprob)
                if self._finished(row, token):
                    continue
                still_active.append(slot)
            if not still_active:
                return
            if len(still_active) < len(active):
                keep = torch.tensor(still_active, device=device)
                cache.batch_select_indices(keep)
                attention_mask, next_positions = attention_mask[keep], next_positions[keep]
                settings = tuple(setting[keep] for setting in settings)  # type: ignore[assignment]
                active = [active[slot] for slot in still_active]
                tokens = [tokens[slot] for slot in still_active]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
            input_ids = torch.tensor(tokens, device=device)[:, None]
            logits = self._forward(input_ids, attention_mask, next_positions[:, None], cache)
            next_positions = next_positions + 1

    def _pad_token_id(self) -> int:
        # Any valid id works: padded positions are masked out of attention and never read.
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1].float()

    def _row_settings(self, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row temperature (0 = greedy), top_k and top_p as tensors, so processing is one batched op."""
        device = self.device
        temperature = torch.tensor([row.request.sampling.temperature for row in rows], device=device)
        top_k = torch.tensor([row.request.sampling.top_k for row in rows], dtype=torch.long, device=device)
        top_p = torch.tensor([row.request.sampling.top_p for row in rows], device=device)
        return temperature, top_k, top_p

    def _mask_early_stops(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """sampling.min_tokens, as vLLM does it: a row shorter than its minimum cannot draw a stop token."""
        short = [slot for slot, row in enumerate(rows) if len(row.response_ids) < row.request.sampling.min_tokens]
        if not short:
            return logits
        logits = logits.clone()  # the first step's logits are one prompt's row, expanded
        for slot in short:
            logits[slot, sorted(rows[slot].request.stop_token_ids)] = float("-inf")
        return logits

    def _choose_tokens(
        self,
        logits: torch.Tensor,
        rows: list[_Row],
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
    ) -> tuple[list[int], list[float]]:
        greedy = temperature == 0
        chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        token_logprobs = torch.empty(len(rows), dtype=torch.float32, device=logits.device)
        if bool(greedy.any()):
            greedy_logits = logits[greedy]
            greedy_tokens = greedy_logits.argmax(dim=-1)
            chosen[greedy] = greedy_tokens
            raw_logprobs = greedy_logits.log_softmax(dim=-1)
            token_logprobs[greedy] = raw_logprobs.gather(-1, greedy_tokens[:, None]).squeeze(-1)
        sampled = ~greedy
        if bool(sampled.any()):
            processed = sampling_logits(logits[sampled], temperature[sampled], top_k[sampled], top_p[sampled])
            sample_logprobs = processed.log_softmax(dim=-1)
            # One uniform per row from the row's own generator: what a row draws never depends on the other rows.
            uniforms = [row.rng.random() for row, is_sampled in zip(rows, sampled.tolist(), strict=True) if is_sampled]
            drawn = inverse_cdf_sample(sample_logprobs.exp(), torch.tensor(uniforms, dtype=torch.float64))
            chosen[sampled] = drawn
            token_logprobs[sampled] = sample_logprobs.gather(-1, drawn[:, None]).squeeze(-1)
        return chosen.tolist(), token_logprobs.tolist()

    def _finished(self, row: _Row, token: int) -> bool:
        request = row.request
        if token in request.stop_token_ids:
            row.finish_reason = "stop"
            return True
        if request.sampling.stop:
            text = self.tokenizer.decode(row.response_ids, skip_special_tokens=True)
            if any(stop in text for stop in request.sampling.stop):
                row.finish_reason = "stop"
                return True
        return len(row.response_ids) >= request.max_new_tokens

    @torch.inference_mode()
    def _logprobs_of(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        if not prompt_ids:
            raise ValueError("compute_logprobs_of needs a non-empty prompt_ids")
        if not response_ids:
            return []
        input_ids = torch.tensor([prompt_ids + response_ids], device=self.device)
        with self._model_lock:
            logits = self.model(input_ids=input_ids, use_cache=False).logits[0].float()
        predicting = logits[len(prompt_ids) - 1 : -1]
        targets = input_ids[0, len(prompt_ids) :]
        return predicting.log_softmax(dim=-1).gather(-1, targets[:, None]).squeeze(-1).tolist()

    def _load_weights(self, weights: Mapping[str, torch.Tensor], version: int) -> None:
        if not isinstance(weights, Mapping):
            raise TypeError(f"load_weights takes a dict of HF name -> tensor, got {type(weights).__name__}")
        if not weights:
            raise ValueError("load_weights got no tensors; a weight sync must send at least one (name, tensor)")
        unknown = [name for name in weights if name not in self._parameter_shapes]
        if unknown:
            hints = []
            for name in unknown[:5]:
                close = difflib.get_close_matches(name, self._parameter_shapes, n=1)
                suffix = next((known for known in self._parameter_shapes if name.endswith("." + known)), None)
                if suffix is not None:
                    hints.append(f"{name!r}: strip the prefix {name[: -len(suffix)]!r}")
                elif close:
                    hints.append(f"{name!r}: did you mean {close[0]!r}?")
            raise ValueError(
                f"load_weights: {len(unknown)} of {len(weights)} names are not weights of this model: {unknown[:10]}. "
                f"Send Hugging Face names as in the model's state_dict(). {' '.join(hints)}".rstrip()
            )
        wrong_shapes = {
            name: (tuple(tensor.shape), self._parameter_shapes[name])
            for name, tensor in weights.items()
            if tuple(tensor.shape) != self._parameter_shapes[name]
        }
        if wrong_shapes:
            shown = [f"{name}: got {got}, model has {want}" for name, (got, want) in list(wrong_shapes.items())[:10]]
            raise ValueError(
                f"load_weights: {len(wrong_shapes)} tensors have the wrong shape ({'; '.join(shown)}); the trainer "
                "and the rollout must hold the same architecture (gather sharded weights before sending)"
            )
        with self._model_lock, torch.no_grad():
            result = self.model.load_state_dict(dict(weights), strict=False)
            # Checked above; a second look at what torch itself reports guards against aliasing surprises.
            if result.unexpected_keys:
                raise ValueError(f"load_weights: the model did not take {result.unexpected_keys[:10]}")
            self._weight_version = int(version)
