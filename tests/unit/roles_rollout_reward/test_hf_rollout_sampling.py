"""HFRollout.generate: seeded reproducibility independent of batching, greedy, sampling log-probs, stopping, limits."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from rlmesh.config import ModelConfig, RolloutConfig, SamplingConfig
from rlmesh.models.tiny import build_char_tokenizer
from rlmesh.roles.rollout import Sample
from rlmesh.roles.rollout.hf import HFRollout, inverse_cdf_sample, sampling_logits

TOKENIZER = build_char_tokenizer()  # the tokenizer saved with tiny_model_path
EOS = TOKENIZER.eos_token_id


def encode(text: str) -> list[int]:
    return list(TOKENIZER.encode(text, add_special_tokens=False))


def make_rollout(path: str, *, batch_across_requests: bool = True, **config: Any) -> HFRollout:
    sampling = config.pop("sampling", SamplingConfig(max_tokens=8))
    rollout_config = RolloutConfig(sampling=sampling, **config)
    return HFRollout(
        rollout_config, ModelConfig(path=path), seed=0, device="cpu", batch_across_requests=batch_across_requests
    )


def record_batches(rollout: HFRollout) -> list[int]:
    """Wraps _run_batch to record how many distinct requests each batch held."""
    requests_per_batch: list[int] = []
    run_batch = rollout._run_batch

    def recording(rows: list[Any]) -> None:
        requests_per_batch.append(len({id(row.request) for row in rows}))
        run_batch(rows)

    rollout._run_batch = recording  # type: ignore[method-assign]
    return requests_per_batch


async def generate_many(rollout: HFRollout, calls: list[tuple[list[int], int, int]]) -> list[list[Sample]]:
    return list(await asyncio.gather(*(rollout.generate(ids, n, seed=seed) for ids, n, seed in calls)))


@pytest.fixture(scope="module")
def rollout(tiny_model_path: str) -> HFRollout:
    return make_rollout(tiny_model_path)


@pytest.fixture(scope="module")
def reference_model(tiny_model_path: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


def full_logits(model: Any, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Logits predicting each response token, from one uncached forward of prompt + response."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]


def test_seeded_samples_do_not_depend_on_what_is_batched_alongside(tiny_model_path: str) -> None:
    rollout = make_rollout(tiny_model_path)
    prompt = encode("23+45=")
    others = [(encode(text), 3, 100 + i) for i, text in enumerate(["7*8=", "123+456=", "9-1="])]
    alone = asyncio.run(rollout.generate(prompt, 4, seed=7))
    batches = record_batches(rollout)
    together = asyncio.run(generate_many(rollout, [*others, (prompt, 4, 7)]))[-1]
    assert max(batches) > 1, "the requests should have shared a batch, or this test checks nothing"
    assert [s.response_ids for s in together] == [s.response_ids for s in alone]
    assert [s.finish_reason for s in together] == [s.finish_reason for s in alone]
    for a, b in zip(alone, together, strict=True):
        # Batched float math differs in the last bits (left padding, other GEMM shapes), not more.
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    again = asyncio.run(rollout.generate(prompt, 4, seed=7))
    assert [s.response_ids for s in again] == [s.response_ids for s in alone]


def test_per_request_batching_is_bitwise_reproducible(tiny_model_path: str) -> None:
    rollout = make_rollout(tiny_model_path, batch_across_requests=False)
    prompt = encode("23+45=")
    others = [(encode(text), 3, 100 + i) for i, text in enumerate(["7*8=", "123+456="])]
    alone = asyncio.run(rollout.generate(prompt, 4, seed=7))
    batches = record_batches(rollout)
    together = asyncio.run(generate_many(rollout, [others[0], (prompt, 4, 7), others[1]]))[1]
    assert batches == [1, 1, 1], "each batch must hold one request's samples"
    assert [(s.response_ids, s.logprobs) for s in together] == [(s.response_ids, s.logprobs) for s in alone]


def test_sample_i_does_not_depend_on_n_and_seeds_matter(rollout: HFRollout, tiny_model_path: str) -> None:
    prompt = encode("12+34=")
    two = asyncio.run(rollout.generate(prompt, 2, seed=3))
    five = asyncio.run(rollout.generate(prompt, 5, seed=3))
    assert [s.response_ids for s in five[:2]] == [s.response_ids for s in two]
    assert len({tuple(s.response_ids) for s in five}) > 1, "each sample draws from its own generator"

    other_seed = asyncio.run(rollout.generate(prompt, 5, seed=4))
    assert [s.response_ids for s in other_seed] != [s.response_ids for s in five]
    # sampling.seed is used when no seed argument is given.
    from_config = asyncio.run(rollout.generate(prompt, 2, SamplingConfig(max_tokens=8, seed=3)))
    assert [s.response_ids for s in from_config] == [s.response_ids for s in two]


def test_greedy_is_argmax_decoding_with_raw_logprobs(
    rollout: HFRollout, reference_model: Any, tiny_model_path: str
) -> None:
    prompt = encode("23+45=")
    samples = asyncio.run(rollout.generate(prompt, 2, SamplingConfig(temperature=0.0, max_tokens=6), seed=1))
    tokens: list[int] = []
    logprobs: list[float] = []
    for _ in range(6):
        with torch.no_grad():
            logits = reference_model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(logits.log_softmax(-1)[token]))
        if token == EOS:
            break
    for sample in samples:
        assert sample.response_ids == tokens
        assert sample.logprobs == pytest.approx(logprobs, abs=1e-5)
        assert sample.finish_reason == ("stop" if tokens[-1] == EOS else "length")


def reference_sampling_logprob(logits: list[float], token: int, temperature: float, top_k: int, top_p: float) -> float:
    """The log-probability of `token` under temperature, then top-k, then top-p, written out by hand."""
    scaled = [z / temperature for z in logits]
    ranked = sorted(range(len(scaled)), key=lambda v: -scaled[v])
    kept = ranked[:top_k] if top_k > 0 else ranked
    top = max(scaled[v] for v in kept)
    weights = {v: math.exp(scaled[v] - top) for v in kept}
    total = sum(weights.values())
    nucleus: list[int] = []
    mass = 0.0
    for v in kept:
        if mass >= top_p and nucleus:
            break
        nucleus.append(v)
        mass += weights[v] / total
    if token not in nucleus:
        return -math.inf
    return math.log(weights[token] / sum(weights[v] for v in nucleus))


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, -1, 1.0), (0.7, 5, 1.0), (1.3, -1, 0.6), (0.8, 6, 0.7)]
)
def test_rollout_logprobs_are_those_of_the_sampling_distribution(
    rollout: HFRollout, reference_model: Any, tiny_model_path: str, temperature: float, top_k: int, top_p: float
) -> None:
    prompt = encode("5+5=")
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=6)
    samples = asyncio.run(rollout.generate(prompt, 6, sampling, seed=11))
    for sample in samples:
        logits = full_logits(reference_model, prompt, sample.response_ids)
        expected = [
            reference_sampling_logprob(step.tolist(), token, temperature, top_k, top_p)
            for step, token in zip(logits, sample.response_ids, strict=True)
        ]
        assert all(math.isfinite(value) for value in expected), "a token outside top-k/top-p was sampled"
        assert sample.logprobs == pytest.approx(expected, abs=1e-4)


def test_sampling_logits_keeps_ties_and_the_top_token_and_is_per_row() -> None:
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0], [5.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    temperature, top_k, top_p = torch.tensor([1.0, 1.0, 2.0]), torch.tensor([2, -1, -1]), torch.tensor([1.0, 0.01, 1.0])
    out = sampling_logits(logits, temperature, top_k, top_p)
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False]  # the tie at the 2nd logit stays
    assert torch.isfinite(out[1]).tolist() == [True, False, False, False]  # top_p below the top prob keeps one
    assert torch.equal(out[2], logits[2] / 2)  # no top-k/top-p on this row: only the temperature


def test_inverse_cdf_sample_follows_the_probabilities_and_never_draws_zero_mass() -> None:
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    grid = torch.arange(1000, dtype=torch.float64) / 1000  # evenly spaced uniforms in [0, 1)
    drawn = inverse_cdf_sample(probs.expand(1000, -1), grid)
    assert torch.bincount(drawn, minlength=5).tolist() == [0, 250, 0, 750, 0]
    # Uniforms at the ends, and rows whose mass does not sum to 1, still land on tokens with mass.
    edges = torch.tensor([0.0, 1 - 2**-53, 1 - 2**-53], dtype=torch.float64)
    rows = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.3, 0.3, 0.0], [0.2, 0.0, 0.0, 0.0]])
    assert inverse_cdf_sample(rows, edges).tolist() == [1, 2, 0]


def test_eos_ends_a_sample_with_stop_and_is_kept(rollout: HFRollout, tiny_model_path: str) -> None:
    prompt = encode("23+45=")
    samples = asyncio.run(rollout.generate(prompt, 16, SamplingConfig(max_tokens=12), seed=5))
    reasons = {sample.finish_reason for sample in samples}
    assert reasons == {"stop", "length"}, "with this seed some samples hit eos and some the limit"
    for sample in samples:
        assert len(sample.response_ids) == len(sample.logprobs) == sum(1 for _ in sample.response_ids)
        assert sample.prompt_ids == prompt
        if sample.finish_reason == "stop":
            assert sample.response_ids[-1] == EOS and EOS not in sample.response_ids[:-1]
        else:
            assert len(sample.response_ids) == 12 and EOS not in sample.response_ids


def test_stop_token_ids_and_stop_strings_end_samples(rollout: HFRollout, tiny_model_path: str) -> None:
    prompt = encode("23+45=")
    seven = encode("7")[0]
    by_id = asyncio.run(rollout.generate(prompt, 16, SamplingConfig(max_tokens=12, stop_token_ids=[seven]), seed=5))
    assert any(s.response_ids[-1] == seven for s in by_id), "with this seed some sample draws a '7'"
    for sample in by_id:
        assert seven not in sample.response_ids[:-1]
        if sample.response_ids[-1] == seven:
            assert sample.finish_reason == "stop"
    by_text = asyncio.run(rollout.generate(prompt, 16, SamplingConfig(max_tokens=12, stop=["+"]), seed=5))
    plus = encode("+")[0]
    assert any(s.finish_reason == "stop" and s.response_ids[-1] == plus for s in by_text)
    for sample in by_text:
        assert plus not in sample.response_ids[:-1]


def test_min_tokens_masks_stop_tokens_until_a_response_is_that_long(rollout: HFRollout) -> None:
    prompt = encode("23+45=")
    free = asyncio.run(rollout.generate(prompt, 16, SamplingConfig(max_tokens=12), seed=5))
    assert any(sample.finish_reason == "stop" and len(sample.response_ids) < 12 for sample in free)
    to_the_cap = asyncio.run(rollout.generate(prompt, 16, SamplingConfig(max_tokens=12, min_tokens=12), seed=5))
    for sample in to_the_cap:
        assert len(sample.response_ids) == 12 and EOS not in sample.response_ids
        assert sample.finish_reason == "length"
    # Greedy, with the greedy first token made a stop token: it ends at once, unless min_tokens holds it back.
    greedy = asyncio.run(rollout.generate(prompt, 1, SamplingConfig(temperature=0.0, max_tokens=1)))[0]
    best, first = greedy.response_ids[0], greedy.logprobs[0]
    stopped = asyncio.run(rollout.generate(prompt, 1, SamplingConfig(temperature=0.0, stop_token_ids=[best])))[0]
    assert stopped.response_ids == [best] and stopped.finish_reason == "stop"
    held = SamplingConfig(temperature=0.0, max_tokens=8, stop_token_ids=[best], min_tokens=3)
    sample = asyncio.run(rollout.generate(prompt, 1, held))[0]
    assert best not in sample.response_ids[:3] and len(sample.response_ids) >= 3
    # The log-prob of a token drawn with the stops (this one and eos) masked is the model's, renormalised over the
    # tokens left.
    raw = asyncio.run(rollout.compute_logprobs_of(prompt, sample.response_ids[:1]))[0]
    eos = asyncio.run(rollout.compute_logprobs_of(prompt, [EOS]))[0]
    assert sample.logprobs[0] == pytest.approx(raw - math.log1p(-math.exp(first) - math.exp(eos)), abs=1e-5)


def test_max_model_len_caps_responses_and_rejects_long_prompts(tiny_model_path: str) -> None:
    rollout = make_rollout(tiny_model_path, max_model_len=9, sampling=SamplingConfig(temperature=0.0, max_tokens=50))
    prompt = encode("23+45=")
    greedy = make_rollout(tiny_model_path, sampling=SamplingConfig(temperature=0.0, max_tokens=3))
    expected = asyncio.run(greedy.generate(prompt, 1))[0]
    sample = asyncio.run(rollout.generate(prompt, 1))[0]
    # 9 positions - 6 prompt tokens leave room for 3, as if max_tokens were 3.
    assert (sample.response_ids, sample.finish_reason) == (expected.response_ids, expected.finish_reason)
    with pytest.raises(ValueError, match="max_model_len=9"):
        asyncio.run(rollout.generate(encode("123+4567="), 1))


@pytest.mark.parametrize(
    ("prompt", "n", "sampling", "match"),
    [
        ([], 1, None, "non-empty"),
        ([3, 99], 1, None, "outside the vocabulary"),
        ([3, 4], 0, None, "n >= 1"),
        ([3, 4], 1, SamplingConfig(temperature=-1), "temperature"),
        ([3, 4], 1, SamplingConfig(top_p=0.0), "top_p"),
        ([3, 4], 1, SamplingConfig(top_k=-2), "top_k"),
        ([3, 4], 1, SamplingConfig(max_tokens=0), "max_tokens"),
        ([3, 4], 1, SamplingConfig(max_tokens=4, min_tokens=5), "min_tokens"),
    ],
)
def test_invalid_requests_fail_with_the_value(
    rollout: HFRollout, prompt: list[int], n: int, sampling: SamplingConfig | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        asyncio.run(rollout.generate(prompt, n, sampling))


def test_configs_may_come_as_dictconfigs(rollout: HFRollout, tiny_model_path: str) -> None:
    prompt = encode("1+1=")
    structured = asyncio.run(rollout.generate(prompt, 2, SamplingConfig(temperature=0.5, max_tokens=4), seed=2))
    as_dictconfig = OmegaConf.structured(SamplingConfig(temperature=0.5, max_tokens=4))
    from_dictconfig = asyncio.run(rollout.generate(prompt, 2, as_dictconfig, seed=2))
    assert [s.response_ids for s in from_dictconfig] == [s.response_ids for s in structured]
    # train.py hands the role its rollout and model configs as DictConfigs.
    rollout_config = OmegaConf.structured(RolloutConfig(sampling=SamplingConfig(temperature=0.5, max_tokens=4)))
    model_config = OmegaConf.structured(ModelConfig(path=tiny_model_path))
    from_hydra = HFRollout(rollout_config, model_config, seed=0, device="cpu")
    again = asyncio.run(from_hydra.generate(prompt, 2, seed=2))
    assert [s.response_ids for s in again] == [s.response_ids for s in structured]
    with pytest.raises(ValueError, match="unknown keys"):
        asyncio.run(rollout.generate(prompt, 1, {"temprature": 0.5}))  # type: ignore[arg-type]


def test_many_concurrent_requests_are_batched_and_all_complete(tiny_model_path: str) -> None:
    rollout = make_rollout(tiny_model_path, generation_batch_size=16)
    prompts = [encode(f"{i}+{i + 3}=") for i in range(20)]
    batches = record_batches(rollout)
    results = asyncio.run(generate_many(rollout, [(prompt, 3, i) for i, prompt in enumerate(prompts)]))
    assert [len(samples) for samples in results] == [3] * 20
    assert all(s.prompt_ids == prompt for samples, prompt in zip(results, prompts, strict=True) for s in samples)
    assert len(batches) < 20 and max(batches) > 1
    stats = asyncio.run(rollout.generation_stats())
    assert stats["generated_tokens"] == sum(len(s.response_ids) for samples in results for s in samples)
