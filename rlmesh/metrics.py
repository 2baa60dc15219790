"""Step and validation metrics under verl's names, computed from a Batch (pure functions)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence

import torch

from rlmesh.algo import explained_variance
from rlmesh.data import Batch


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    values = values.float()
    if values.numel() == 0:
        return {}
    return {
        f"{prefix}/mean": values.mean().item(),
        f"{prefix}/max": values.max().item(),
        f"{prefix}/min": values.min().item(),
    }


def rollout_probs_diff_metrics(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """How far the engine's token probabilities are from the trainer's on the same weights (verl's
    training/rollout_probs_diff_{max,mean,std}), over response tokens: |exp(old) - exp(rollout)|."""
    keep = mask.bool()
    diff = (old_logprobs.float().exp() - rollout_logprobs.float().exp()).abs()[keep]
    if diff.numel() == 0:
        return {}
    return {
        "training/rollout_probs_diff_max": diff.max().item(),
        "training/rollout_probs_diff_mean": diff.mean().item(),
        "training/rollout_probs_diff_std": diff.std(unbiased=False).item(),
    }


def staleness_metrics(
    first_versions: Sequence[int | None], last_versions: Sequence[int | None] | None, policy_version: int
) -> dict[str, float]:
    """rollout/staleness/{mean,max,min}: how many weight versions behind the trainer's each sample was when its
    generation began (0 in sync mode, at most 1 with one_step_off, at most async.max_staleness in async mode), and
    rollout/version_span/{mean,max,min}: how many syncs landed while it was generated (last - first version), and
    the staleness histogram as rollout/staleness/frac_K, the fraction of samples K versions old, for each K seen.
    Samples with no recorded version are left out."""
    lasts = list(last_versions) if last_versions is not None else list(first_versions)
    known = [(first, last) for first, last in zip(first_versions, lasts, strict=True) if first is not None]
    if not known:
        return {}
    stale = torch.tensor([policy_version - first for first, _ in known], dtype=torch.float32)
    spans = torch.tensor([(last if last is not None else first) - first for first, last in known], dtype=torch.float32)
    ages, counts = stale.unique(return_counts=True)
    histogram = {f"rollout/staleness/frac_{int(age)}": int(c) / len(known) for age, c in zip(ages, counts, strict=True)}
    return _stats("rollout/staleness", stale) | _stats("rollout/version_span", spans) | histogram


def idle_ratio(before: Sequence[Mapping[str, float]], after: Sequence[Mapping[str, float]]) -> float | None:
    """rollouter/idle_ratio: the share of the engines' time, between two readings of each engine's BusyClock, with
    no request in flight (or paused for a weight sync). An engine replaced in between (its alive time went back)
    counts from its start. None when no time passed."""
    busy = alive = 0.0
    for old, new in zip(before, after, strict=True):
        restarted = new["alive_s"] < old["alive_s"]
        busy += new["busy_s"] - (0.0 if restarted else old["busy_s"])
        alive += new["alive_s"] - (0.0 if restarted else old["alive_s"])
    return 1.0 - busy / alive if alive > 0 else None


def data_metrics(batch: Batch, *, max_response_length: int, max_prompt_length: int) -> dict[str, float]:
    """critic/score, critic/rewards, critic/advantages, critic/returns, critic/values, response_length and
    prompt_length statistics, as verl's compute_data_metrics names them."""
    mask = batch["response_mask"].bool()
    response_length = mask.sum(-1).float()
    prompt_width = batch["prompt_ids"].shape[1]
    prompt_length = batch["attention_mask"][:, :prompt_width].sum(-1).float()  # prompts are left-padded
    out: dict[str, float] = {}
    out |= _stats("critic/score", batch["token_level_scores"].sum(-1))
    out |= _stats("critic/rewards", batch["token_level_rewards"].sum(-1))
    for key in ("advantages", "returns", "values"):
        if key in batch:
            out |= _stats(f"critic/{key}", batch[key][mask])
    if "values" in batch and "returns" in batch:
        out["critic/vf_explained_var"] = float(explained_variance(batch["values"], batch["returns"], mask))
    out |= _stats("response_length", response_length)
    out["response_length/clip_ratio"] = (response_length >= max_response_length).float().mean().item()
    out |= _stats("prompt_length", prompt_length)
    out["prompt_length/clip_ratio"] = (prompt_length >= max_prompt_length).float().mean().item()
    return out


def throughput_metrics(tokens: float, step_seconds: float, n_devices: int) -> dict[str, float]:
    """perf/total_num_tokens (prompt + response tokens of the step) and perf/throughput in tokens/s per device."""
    return {
        "perf/total_num_tokens": tokens,
        "perf/time_per_step": step_seconds,
        "perf/throughput": tokens / max(step_seconds, 1e-9) / max(n_devices, 1),
    }


def reward_metrics(batch: Batch) -> dict[str, float]:
    """reward/errors (the reward function raised), reward/invalid (it returned no usable number) and reward/timeouts
    counts, and the mean of every extra a scorer returned (e.g. acc)."""
    failures = batch.get("reward_failure", [None] * len(batch))
    out = {
        "reward/errors": float(sum(f == "error" for f in failures)),
        "reward/invalid": float(sum(f == "invalid" for f in failures)),
        "reward/timeouts": float(sum(f == "timeout" for f in failures)),
    }
    for key in batch.meta.get("reward_extra_keys", ()):
        values = [float(v) for v in batch[key] if isinstance(v, (int, float, bool))]
        if values:
            out[f"reward/{key}/mean"] = sum(values) / len(values)
    return out


def validation_metrics(
    data_sources: Sequence[str], scores: Sequence[float], accs: Sequence[float | None] | None, n: int
) -> dict[str, float]:
    """val-core/<data_source>/acc/mean@n (accuracy where the scorer reports one, else the score: an environment's
    reward, say) and val-core/<data_source>/reward/mean@n, averaged over every sample of every prompt."""
    by_source: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for i, source in enumerate(data_sources):
        reported = accs[i] if accs is not None else None
        by_source[source].append((float(scores[i]), float(reported if reported is not None else scores[i])))
    out: dict[str, float] = {}
    for source, pairs in by_source.items():
        out[f"val-core/{source}/reward/mean@{n}"] = sum(p[0] for p in pairs) / len(pairs)
        out[f"val-core/{source}/acc/mean@{n}"] = sum(p[1] for p in pairs) / len(pairs)
    return out


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which `correct` are correct (Chen et al. 2021): the chance
    that at least one of k samples drawn without replacement is correct, 1 - C(n - c, k) / C(n, k)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n} samples per prompt")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def majority_correct(predictions: Sequence[Hashable | None], correct: Sequence[bool]) -> float:
    """maj@k of one prompt's k samples: 1.0 if the answer most samples predicted (the first of a tie; samples with no
    prediction do not vote) is a correct one, else 0.0."""
    votes = Counter(p for p in predictions if p is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(p for p in predictions if p is not None and votes[p] == top)
    return float(any(ok for p, ok in zip(predictions, correct, strict=True) if p == winner))


def bootstrap_interval(
    values: Sequence[float], resamples: int, confidence: float, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` (one per prompt), over `resamples` draws of the
    prompts with replacement."""
    data = torch.tensor(list(values), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(data), (resamples, len(data)), generator=generator)
    means = data[draws].mean(dim=1)
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return float(low), float(high)


def sample_counts(n: int) -> list[int]:
    """The k of pass@k and maj@k reported for n samples per prompt: 1, 2, 4, ... up to n, and n."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


def evaluation_metrics(
    data_sources: Sequence[str],
    scores: Sequence[float],
    accs: Sequence[float | None] | None,
    predictions: Sequence[Hashable | None] | None,
    n: int,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """`rlmesh eval`'s metrics per data source, under verl's val-core/<source>/<var>/<metric> names: acc/mean@n and
    reward/mean@n (as in-loop validation reports them), acc/pass@k (unbiased) and, where the scorer returns a
    prediction (`pred`), acc/maj@k, each k of sample_counts(n), and each with a bootstrap interval over prompts
    (<name>/ci_low, <name>/ci_high) unless resamples is 0. Samples come n per prompt, prompt after prompt. A sample
    is correct (for pass@k and maj@k) when its acc, else its score, exceeds 0.5."""
    if len(scores) % n:
        raise ValueError(f"{len(scores)} samples are not {n} per prompt")
    per_prompt: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ks = sample_counts(n)
    for start in range(0, len(scores), n):
        group = range(start, start + n)
        source = data_sources[start]
        reported = [accs[i] if accs is not None else None for i in group]
        values = [float(scores[i] if acc is None else acc) for i, acc in zip(group, reported, strict=True)]
        correct = [value > 0.5 for value in values]
        found = per_prompt[source]
        found[f"acc/mean@{n}"].append(sum(values) / n)
        found[f"reward/mean@{n}"].append(sum(float(scores[i]) for i in group) / n)
        for k in ks:
            found[f"acc/pass@{k}"].append(pass_at_k(n, sum(correct), k))
            if predictions is not None:  # a prompt whose samples predicted nothing has no majority: 0
                found[f"acc/maj@{k}"].append(majority_correct([predictions[i] for i in group][:k], correct[:k]))
    out: dict[str, float] = {}
    for source, metrics in per_prompt.items():
        for name, values in metrics.items():
            key = f"val-core/{source}/{name}"
            out[key] = sum(values) / len(values)
            if resamples > 0:
                out[f"{key}/ci_low"], out[f"{key}/ci_high"] = bootstrap_interval(values, resamples, confidence, seed)
    return out
