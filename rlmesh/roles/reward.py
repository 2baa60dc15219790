"""Reward roles: rule-based scoring in a time-limited process pool (RuleReward) and a reward model (ModelReward)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlmesh.config import OverlongBufferConfig, Report, RewardConfig, RlmeshConfig, check_model_path
from rlmesh.data.batch import Batch, even_sizes, response_tokens
from rlmesh.engine.devices import resolve_device, resolve_dtype
from rlmesh.mesh import endpoint
from rlmesh.reward import RewardScorer, ScoreItem, default_compute_score, load_compute_score, overlong_penalty

logger = logging.getLogger(__name__)

# Fields every reward role returns; a compute_score extra with one of these names would overwrite them.
REWARD_FIELDS = ("token_level_scores", "score", "reward_failure", "overlong_reward", "overlong")
# The meta key naming the per-sample extras (the scorer's dict keys, the overlong fields) that metrics average.
EXTRA_KEYS_META = "reward_extra_keys"


def split_for_scoring(num_shards: int, batch: Batch) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """`shard` dispatch for score(): contiguous parts of sizes differing by at most one, without the mesh's default
    padding rows (a padded row would be scored, and counted as an error or timeout, for nothing). The batch may be
    a StoredRows view of one: its parts are views too."""
    starts = [0, *itertools.accumulate(even_sizes(len(batch), num_shards))]
    return [((batch[starts[i] : starts[i + 1]],), {}) for i in range(num_shards)]


def gather_scores(results: list[Batch]) -> Batch:
    """`shard` collect for score(): the parts in order. A compute_score extra that some part lacks (every sample of
    that part failed, or its scorer returned no such key) is filled with None there, so the parts concatenate, and
    meta["reward_extra_keys"] lists the extras of all parts."""
    keys = list(dict.fromkeys(key for part in results for key in part.non_tensors))
    extra_keys = list(dict.fromkeys(key for part in results for key in part.meta.get(EXTRA_KEYS_META, ())))
    for part in results:
        for key in keys:
            if key not in part.non_tensors:
                part[key] = [None] * len(part)
        part.meta[EXTRA_KEYS_META] = extra_keys
    return Batch.concat(results)


def response_lengths(batch: Batch) -> torch.Tensor:
    """Response tokens per sample ([B] long), the tool and environment tokens of a multi-turn rollout included: the
    score goes on the last of them (response_tokens)."""
    if "response_mask" not in batch:
        raise KeyError(f"reward scoring needs 'response_mask' (1 on generated tokens); the batch has {batch.keys()}")
    return response_tokens(batch).sum(dim=-1).long()


def place_scores(scores: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] float32 zeros holding each score at its sample's last response token (lengths - 1); an empty
    response puts its score at position 0, so the sequence still carries its reward."""
    if width < 1:
        raise ValueError(
            "the batch's responses have width 0, so there is no token to put the reward on; pad responses to at least "
            "one position (Batch.from_generations(response_length=...))"
        )
    token_level = torch.zeros((len(scores), width), dtype=torch.float32)
    positions = (lengths - 1).clamp(min=0, max=width - 1)
    token_level[torch.arange(len(scores)), positions] = scores.to(torch.float32)
    return token_level


class _Overlong:
    """DAPO's overlong penalty settings (reward.overlong_buffer), checked once at construction."""

    def __init__(self, overlong_buffer: OverlongBufferConfig, max_response_length: int) -> None:
        self.enabled = bool(overlong_buffer.enable)
        self.buffer_len = int(overlong_buffer.len)
        self.penalty_factor = float(overlong_buffer.penalty_factor)
        self.max_response_length = max_response_length
        if self.enabled and not 0 < self.buffer_len <= max_response_length:
            raise ValueError(
                f"reward.overlong_buffer.len must be in (0, max_response_length={max_response_length}] when the "
                f"overlong penalty is enabled, got {self.buffer_len}; set it to e.g. max_response_length // 4"
            )

    def penalties(self, lengths: torch.Tensor) -> list[float]:
        return [
            overlong_penalty(length, self.max_response_length, self.buffer_len, self.penalty_factor)
            for length in lengths.tolist()
        ]


def _scored_batch(
    batch: Batch,
    scores: Sequence[float],
    failures: Sequence[str | None],
    extras: Mapping[str, list[Any]],
    overlong: _Overlong,
) -> Batch:
    """The reward fields of `batch`'s rows: token_level_scores = score + overlong penalty at the last response token;
    non-tensors score (the scorer's, before the penalty, as verl logs it), reward_failure, the scorer's extras, and
    overlong_reward / overlong when the penalty is on. meta["reward_extra_keys"] names the extras and overlong fields
    (what metrics average)."""
    lengths = response_lengths(batch)
    rewards = torch.tensor(list(scores), dtype=torch.float64)
    non_tensors: dict[str, list[Any]] = {"score": [float(score) for score in scores], "reward_failure": list(failures)}
    if overlong.enabled:
        penalties = overlong.penalties(lengths)
        rewards = rewards + torch.tensor(penalties, dtype=torch.float64)
        non_tensors["overlong_reward"] = penalties
        non_tensors["overlong"] = [penalty < 0 for penalty in penalties]
    clashing = sorted(set(extras) & set(REWARD_FIELDS))
    if clashing:
        raise ValueError(
            f"the reward function returned keys {clashing}, which are the reward role's own fields; rename them in "
            "the dict your compute_score returns"
        )
    non_tensors.update({key: list(values) for key, values in extras.items()})
    extra_keys = [*extras, *(("overlong_reward", "overlong") if overlong.enabled else ())]
    width = batch["response_ids"].shape[1] if "response_ids" in batch else batch["response_mask"].shape[1]
    token_level = place_scores(rewards, lengths, width) if len(batch) else torch.zeros((0, width))
    return Batch({"token_level_scores": token_level}, non_tensors, {EXTRA_KEYS_META: extra_keys}, size=len(batch))


def _plain_dict(value: Any) -> dict[str, Any]:
    """A plain dict from a dict or a DictConfig (what Hydra hands the roles), so it pickles to the scoring workers."""
    if value is None:
        return {}
    if isinstance(value, DictConfig):
        return cast(dict[str, Any], OmegaConf.to_container(value, resolve=True))
    return dict(value)


def _ground_truths(batch: Batch) -> list[Any]:
    if "ground_truth" in batch:
        return list(batch["ground_truth"])
    if "reward_model" in batch:  # a raw verl row: {"style": "rule", "ground_truth": ...}
        return [info["ground_truth"] for info in batch["reward_model"]]
    raise KeyError(f"rule rewards need a 'ground_truth' non-tensor field per sample; the batch has {batch.keys()}")


class RuleReward:
    """Scores responses with a verl-style compute_score in worker processes, each sample under a time limit.

    The function is reward.custom_reward_function ({path, name}, with reward.reward_kwargs bound) or, without a path,
    the built-in scorer for each sample's data_source. A sample whose scorer raises or runs past reward.timeout_s gets
    reward.fallback_score and is marked in `reward_failure` ('error' | 'timeout'); the batch always finishes.
    """

    needs_gpu = False  # scoring runs in CPU worker processes

    def __init__(self, config: RewardConfig, *, tokenizer_path: str, max_response_length: int) -> None:
        custom = config.custom_reward_function
        kwargs = _plain_dict(config.reward_kwargs)
        compute_score = load_compute_score(custom.path, custom.name or "compute_score", **kwargs)
        self.scorer = RewardScorer(
            compute_score,
            num_workers=config.num_workers,
            timeout_s=config.timeout_s,
            fallback_score=config.fallback_score,
            # The built-in math scorer imports sympy; a user's function gets no head start it does not need.
            preload_modules=("math_verify",) if compute_score is default_compute_score else (),
        )
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.overlong = _Overlong(config.overlong_buffer, max_response_length)

    @endpoint(dispatch=split_for_scoring, collect=gather_scores)
    def score(self, batch: Batch) -> Batch:
        """The reward fields of every row (see _scored_batch), in the rows' order."""
        if len(batch) == 0:
            return _scored_batch(batch, [], [], {}, self.overlong)
        for key in ("data_source", "response_ids"):
            if key not in batch:
                raise KeyError(f"rule rewards need the batch field {key!r}; the batch has {batch.keys()}")
        ground_truths = _ground_truths(batch)
        extra_infos = batch.get("extra_info") or [None] * len(batch)
        mask = response_tokens(batch)  # a multi-turn response is read whole, tool results included
        # Special tokens are skipped, as verl does: '68<|endoftext|>' reads '68', which exact match wants.
        texts = self.tokenizer.batch_decode(
            [ids[keep].tolist() for ids, keep in zip(batch["response_ids"], mask, strict=True)],
            skip_special_tokens=True,
        )
        items = [
            ScoreItem(str(source), text, truth, dict(info) if info is not None else None)
            for source, text, truth, info in zip(batch["data_source"], texts, ground_truths, extra_infos, strict=True)
        ]
        # An environment that rewards its episodes has the last word on them; the function scores the rest.
        env_rewards = batch.get("env_reward") or [None] * len(batch)
        unscored = [i for i, reward in enumerate(env_rewards) if reward is None]
        result = self.scorer.score([items[i] for i in unscored])
        scores = [float(reward) if reward is not None else 0.0 for reward in env_rewards]
        failures: list[str | None] = [None] * len(batch)
        extras: dict[str, list[Any]] = {key: [None] * len(batch) for key in result.extras}
        for position, i in enumerate(unscored):
            scores[i], failures[i] = result.scores[position], result.failures[position]
            for key, values in result.extras.items():
                extras[key][i] = values[position]
        return _scored_batch(batch, scores, failures, extras, self.overlong)

    def close(self) -> None:
        """Stop the scoring processes now, not at garbage collection (a later score() restarts them). Not an
        endpoint: the mesh's shutdown kills the actor, and its workers exit with it."""
        self.scorer.close()

    def __del__(self) -> None:
        scorer = getattr(self, "scorer", None)
        if scorer is not None:
            scorer.close()


class ModelReward:
    """Scores prompt + response with a sequence-classification reward model (num_labels=1), in micro-batches.

    Token ids go to the reward model as they are when its tokenizer has the policy's vocabulary; otherwise the text
    is decoded with the policy tokenizer and re-encoded with the reward model's (no chat template is re-applied).
    """

    needs_gpu = True  # the reward model runs on the run's device

    @staticmethod
    def preflight(bad: Report, cfg: RlmeshConfig, device: str) -> None:
        check_model_path(bad, "roles.reward.model.path", cfg.roles.reward.model.path)

    def __init__(
        self, config: RewardConfig, *, tokenizer_path: str, max_response_length: int, device: str = "auto"
    ) -> None:
        if config.micro_batch_size_per_device < 1:
            raise ValueError(
                f"reward.micro_batch_size_per_device must be at least 1, got {config.micro_batch_size_per_device}"
            )
        self.micro_batch_size = config.micro_batch_size_per_device
        self.device = resolve_device(device)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            config.model.path,
            use_safetensors=True,  # never a pickled .bin: unpickling a downloaded file can run its code
            num_labels=1,
            dtype=resolve_dtype(config.model.dtype, device=self.device),
            attn_implementation=config.model.attn_implementation,
            trust_remote_code=config.model.trust_remote_code,
        )
        torch.nn.Module.to(self.model, self.device)  # PreTrainedModel.to has a wrapper type mypy cannot call
        self.model.eval().requires_grad_(False)
        text_config = self.model.config.get_text_config()
        if text_config.pad_token_id is None:
            # transformers refuses batches without a pad id even when pooling needs none (see _score_micro_batch).
            text_config.pad_token_id = 0
        self.policy_tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.model_tokenizer = AutoTokenizer.from_pretrained(
            config.model.path, trust_remote_code=config.model.trust_remote_code
        )
        self.same_vocabulary = self.policy_tokenizer.get_vocab() == self.model_tokenizer.get_vocab()
        self.overlong = _Overlong(config.overlong_buffer, max_response_length)

    @endpoint(dispatch=split_for_scoring, collect=gather_scores)
    def score(self, batch: Batch) -> Batch:
        """The reward model's score of every row (see _scored_batch), in the rows' order."""
        sequences = self._sequences(batch)
        scores: list[float] = []
        for start in range(0, len(sequences), self.micro_batch_size):
            scores.extend(self._score_micro_batch(sequences[start : start + self.micro_batch_size]))
        return _scored_batch(batch, scores, [None] * len(batch), {}, self.overlong)

    def _sequences(self, batch: Batch) -> list[list[int]]:
        """Each row's real prompt tokens followed by its real response tokens, in the reward model's ids."""
        if len(batch) == 0:
            return []
        prompt_width = batch["prompt_ids"].shape[1]
        prompt_mask = batch["attention_mask"][:, :prompt_width].bool()
        response_mask = response_tokens(batch)
        sequences = []
        for prompt, prompt_keep, response, response_keep in zip(
            batch["prompt_ids"], prompt_mask, batch["response_ids"], response_mask, strict=True
        ):
            prompt_ids, response_ids = prompt[prompt_keep].tolist(), response[response_keep].tolist()
            if not self.same_vocabulary:
                prompt_text = str(self.policy_tokenizer.decode(prompt_ids))
                text = prompt_text + str(self.policy_tokenizer.decode(response_ids, skip_special_tokens=True))
                sequences.append(self.model_tokenizer.encode(text, add_special_tokens=False))
            else:
                sequences.append(prompt_ids + response_ids)
        return sequences

    @torch.inference_mode()
    def _score_micro_batch(self, sequences: list[list[int]]) -> list[float]:
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
            attention_mask[row, width - len(sequence) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        # Left padding puts every sequence's last token at the last position. Passing embeddings makes the model pool
        # there: from input_ids it would pool at the last token that is not pad_token_id, which is wrong when a
        # response ends in a token equal to the pad id (eos == pad in many models) and fails with no pad id at all.
        embeddings = self.model.get_input_embeddings()(input_ids)
        logits = self.model(inputs_embeds=embeddings, attention_mask=attention_mask, position_ids=positions).logits
        return logits[:, 0].float().tolist()
