"""Step and validation metrics under verl's names, computed from a Batch (pure functions)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

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
