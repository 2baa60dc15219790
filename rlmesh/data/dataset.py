"""PromptDataset (verl-format rows, chat-templated and length-checked) and PromptLoader (seeded, resumable batches)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypedDict, TypeVar, get_args

import numpy as np

from rlmesh.data.sources import UnreadableRow, progress, read_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

OverlongPolicy = Literal["filter", "truncate_left", "truncate_right", "error"]
OVERLONG_POLICIES: tuple[str, ...] = get_args(OverlongPolicy)
REQUIRED_FIELDS = ("data_source", "prompt", "reward_model")
# Enough individual warnings to show a pattern without flooding the log; the total is always logged and exposed.
MAX_LOGGED_ROWS = 10
# Prompts are templated and tokenized in chunks so the fast tokenizer batches in Rust without holding every text.
TOKENIZE_CHUNK = 1024


class PromptRow(TypedDict):
    """One usable prompt. `index` is the row's position in the source (across all sources, in order)."""

    index: int
    prompt_ids: list[int]
    raw_prompt: list[dict[str, Any]]
    data_source: str
    ground_truth: Any
    ability: str
    extra_info: dict[str, Any]


class _Record(TypedDict):
    index: int
    raw_prompt: list[dict[str, Any]]
    data_source: str
    ground_truth: Any
    ability: str
    extra_info: dict[str, Any]


class PromptDataset:
    """Prompts in verl's row format, tokenized once at construction.

    A row is `{"data_source": str, "prompt": [{"role", "content"}, ...], "ability": str,
    "reward_model": {"style": str, "ground_truth": ...}, "extra_info": dict}`; `ability`, `style` and `extra_info`
    may be missing. Sources: parquet, jsonl/json, a `datasets.save_to_disk` directory, or a hub name (see
    `rlmesh.data.sources.read_rows`); several sources are read in order.

    - The prompt is rendered with the tokenizer's chat template (`add_generation_prompt=True`) and tokenized without
      extra special tokens. With `apply_chat_template=False` the message contents are joined by newlines and
      tokenized with the tokenizer's own special tokens.
    - Prompts longer than `max_prompt_length` tokens: `overlong="error"` raises naming the row (the default, as in
      verl), `"filter"` drops them (count in `num_filtered`, logged), `"truncate_left"` keeps the last tokens,
      `"truncate_right"` the first.
    - A malformed row (missing field, wrong type, empty prompt, unreadable line) is logged with its index, counted
      in `malformed_rows`, and skipped; with `strict=True` it raises. No usable row at all is an error.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_prompt_length: int,
        overlong: OverlongPolicy = "error",
        apply_chat_template: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        strict: bool = False,
        split: str = "train",
        hub_config: str | None = None,
    ) -> None:
        sources = [source] if isinstance(source, str | os.PathLike) else list(source)
        if not sources:
            raise ValueError("PromptDataset needs at least one source (a file, a directory or a hub dataset name)")
        rows: list[Any] = []
        for one_source in sources:
            source_rows = read_rows(one_source, split=split, hub_config=hub_config)
            if not source_rows:
                raise ValueError(f"prompt source {str(one_source)!r} has no rows")
            rows.extend(source_rows)
        name = ", ".join(str(one_source) for one_source in sources)
        self._load(
            rows,
            tokenizer,
            name=name,
            max_prompt_length=max_prompt_length,
            overlong=overlong,
            apply_chat_template=apply_chat_template,
            chat_template_kwargs=chat_template_kwargs,
            strict=strict,
        )

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_prompt_length: int,
        name: str = "in-memory rows",
        overlong: OverlongPolicy = "error",
        apply_chat_template: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        strict: bool = False,
    ) -> PromptDataset:
        """A dataset over rows already in memory (a list of dicts or a `datasets.Dataset`), e.g. synthetic tasks."""
        dataset = cls.__new__(cls)
        dataset._load(
            list(rows),
            tokenizer,
            name=name,
            max_prompt_length=max_prompt_length,
            overlong=overlong,
            apply_chat_template=apply_chat_template,
            chat_template_kwargs=chat_template_kwargs,
            strict=strict,
        )
        return dataset

    def _load(
        self,
        rows: list[Any],
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        max_prompt_length: int,
        overlong: str,
        apply_chat_template: bool,
        chat_template_kwargs: Mapping[str, Any] | None,
        strict: bool,
    ) -> None:
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={overlong!r} is not a policy; use one of {list(OVERLONG_POLICIES)}")
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        if apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no chat_template; set one on the tokenizer, or pass "
                f"apply_chat_template=False to join the message contents as plain text"
            )
        if not rows:
            raise ValueError(f"{name} has no rows")
        self.name = name
        self.max_prompt_length = max_prompt_length
        self.overlong = overlong
        self.num_source_rows = len(rows)
        self.malformed_rows: list[tuple[int, str]] = []
        self.overlong_rows: list[tuple[int, int]] = []

        records: list[_Record] = []
        for index, row in enumerate(rows):
            record_or_reason = _validate_row(index, row)
            if isinstance(record_or_reason, str):
                self._report_malformed(index, record_or_reason, strict)
            else:
                records.append(record_or_reason)

        kept: list[_Record] = []
        token_ids: list[list[int]] = []
        chunks = range(0, len(records), TOKENIZE_CHUNK)
        for start in progress(chunks, f"tokenizing {name}", len(chunks), unit=f"x{TOKENIZE_CHUNK} rows"):
            chunk = records[start : start + TOKENIZE_CHUNK]
            texts = self._render(chunk, tokenizer, apply_chat_template, dict(chat_template_kwargs or {}), strict)
            rendered = [(record, text) for record, text in zip(chunk, texts, strict=True) if text is not None]
            encoded = tokenizer(
                [text for _, text in rendered], add_special_tokens=not apply_chat_template, return_attention_mask=False
            )["input_ids"]
            for (record, _), ids in zip(rendered, encoded, strict=True):
                fitted = self._fit_length(record["index"], list(ids))
                if fitted is not None:
                    kept.append(record)
                    token_ids.append(fitted)

        self._log_summary()
        if not kept:
            raise ValueError(
                f"{name} has no usable rows: {self.num_source_rows} rows, {len(self.malformed_rows)} malformed, "
                f"{self.num_filtered} longer than max_prompt_length={max_prompt_length} and filtered; the first "
                f"problems: {self.malformed_rows[:3]}"
            )
        self._records = kept
        # One flat int array plus offsets costs ~4 bytes a token, where a list of Python ints costs ~36.
        self._offsets = np.zeros(len(token_ids) + 1, dtype=np.int64)
        np.cumsum([len(ids) for ids in token_ids], out=self._offsets[1:])
        self._token_ids = np.fromiter(
            (token for ids in token_ids for token in ids), dtype=np.int64, count=int(self._offsets[-1])
        )
        if self._token_ids.size and self._token_ids.max() <= np.iinfo(np.int32).max:
            self._token_ids = self._token_ids.astype(np.int32)

    def _render(
        self,
        records: list[_Record],
        tokenizer: PreTrainedTokenizerBase,
        apply_chat_template: bool,
        template_kwargs: dict[str, Any],
        strict: bool,
    ) -> list[str | None]:
        """Prompt text per record; None where the chat template rejected the conversation (reported as malformed)."""
        if not apply_chat_template:
            return ["\n".join(message["content"] for message in record["raw_prompt"]) for record in records]
        options = {"tokenize": False, "add_generation_prompt": True, **template_kwargs}
        try:
            texts = tokenizer.apply_chat_template([record["raw_prompt"] for record in records], **options)
            return [str(text) for text in texts]
        except Exception:
            # One conversation the template rejects should cost that row only; find it by rendering one at a time.
            pass
        rendered: list[str | None] = []
        for record in records:
            try:
                rendered.append(str(tokenizer.apply_chat_template(record["raw_prompt"], **options)))
            except Exception as error:
                self._report_malformed(
                    record["index"], f"chat template failed: {type(error).__name__}: {error}", strict
                )
                rendered.append(None)
        return rendered

    def _fit_length(self, index: int, ids: list[int]) -> list[int] | None:
        if len(ids) <= self.max_prompt_length:
            return ids
        self.overlong_rows.append((index, len(ids)))
        if self.overlong == "error":
            raise ValueError(
                f"row {index} of {self.name} has a prompt of {len(ids)} tokens, longer than max_prompt_length="
                f"{self.max_prompt_length}; raise max_prompt_length, or set overlong to 'filter', 'truncate_left' or "
                f"'truncate_right'"
            )
        if self.overlong == "filter":
            return None
        if self.overlong == "truncate_left":
            return ids[-self.max_prompt_length :]
        return ids[: self.max_prompt_length]

    def _report_malformed(self, index: int, reason: str, strict: bool) -> None:
        if strict:
            raise ValueError(f"row {index} of {self.name} is malformed: {reason} (strict=True; fix or drop the row)")
        self.malformed_rows.append((index, reason))
        if len(self.malformed_rows) <= MAX_LOGGED_ROWS:
            logger.warning("skipping malformed row %d of %s: %s", index, self.name, reason)

    def _log_summary(self) -> None:
        if self.malformed_rows:
            logger.warning(
                "%s: skipped %d malformed rows of %d (first: %s)",
                self.name,
                len(self.malformed_rows),
                self.num_source_rows,
                [index for index, _ in self.malformed_rows[:MAX_LOGGED_ROWS]],
            )
        if self.overlong_rows:
            action = "filtered" if self.overlong == "filter" else f"truncated ({self.overlong})"
            logger.warning(
                "%s: %s %d prompts longer than max_prompt_length=%d (rows %s)",
                self.name,
                action,
                len(self.overlong_rows),
                self.max_prompt_length,
                [index for index, _ in self.overlong_rows[:MAX_LOGGED_ROWS]],
            )

    @property
    def num_malformed(self) -> int:
        return len(self.malformed_rows)

    @property
    def num_filtered(self) -> int:
        """Rows dropped for being longer than max_prompt_length (0 unless overlong="filter")."""
        return len(self.overlong_rows) if self.overlong == "filter" else 0

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, position: int) -> PromptRow:
        if not -len(self) <= position < len(self):
            raise IndexError(f"position {position} is out of range for a PromptDataset of {len(self)} rows")
        position %= len(self)
        record = self._records[position]
        ids = self._token_ids[self._offsets[position] : self._offsets[position + 1]]
        return {
            "index": record["index"],
            "prompt_ids": ids.tolist(),
            "raw_prompt": record["raw_prompt"],
            "data_source": record["data_source"],
            "ground_truth": record["ground_truth"],
            "ability": record["ability"],
            "extra_info": record["extra_info"],
        }

    def __repr__(self) -> str:
        return (
            f"PromptDataset({self.name!r}, rows={len(self)}, malformed={self.num_malformed}, "
            f"overlong={len(self.overlong_rows)} ({self.overlong}), max_prompt_length={self.max_prompt_length})"
        )


def _validate_row(index: int, row: Any) -> _Record | str:
    """The row's fields, or why it is unusable."""
    if isinstance(row, UnreadableRow):
        return row.reason
    if not isinstance(row, Mapping):
        return f"expected an object with fields {list(REQUIRED_FIELDS)}, got {type(row).__name__}"
    missing = [field for field in REQUIRED_FIELDS if row.get(field) is None]
    if missing:
        return f"missing field(s) {missing}"
    data_source = row["data_source"]
    if not isinstance(data_source, str) or not data_source:
        return f"data_source must be a non-empty string, got {data_source!r:.80}"
    prompt = row["prompt"]
    if isinstance(prompt, np.ndarray):  # pandas-written parquet read back through pandas gives arrays
        prompt = prompt.tolist()
    if not isinstance(prompt, list):
        return f"prompt must be a list of chat messages {{role, content}}, got {type(prompt).__name__}"
    if not prompt:
        return "empty prompt (no messages)"
    for position, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            return f"prompt message {position} must be an object {{role, content}}, got {type(message).__name__}"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"prompt message {position} needs a string {key!r}, got {message.get(key)!r:.80}"
    if not any(message["content"].strip() for message in prompt):
        return "empty prompt (every message content is blank)"
    reward_model = row["reward_model"]
    if not isinstance(reward_model, Mapping):
        return f"reward_model must be an object {{style, ground_truth}}, got {type(reward_model).__name__}"
    if reward_model.get("ground_truth") is None:
        return "missing field reward_model.ground_truth"
    ability = row.get("ability")
    if ability is not None and not isinstance(ability, str):
        return f"ability must be a string, got {type(ability).__name__}"
    extra_info = row.get("extra_info")
    if extra_info is not None and not isinstance(extra_info, Mapping):
        return f"extra_info must be an object, got {type(extra_info).__name__}"
    return {
        "index": index,
        "raw_prompt": [dict(message) for message in prompt],
        "data_source": data_source,
        "ground_truth": reward_model["ground_truth"],
        "ability": ability or "",
        "extra_info": dict(extra_info or {}),
    }


RowT = TypeVar("RowT", covariant=True)


class _RowSource(Protocol[RowT]):
    def __len__(self) -> int: ...

    def __getitem__(self, position: int) -> RowT: ...


class PromptLoader(Generic[RowT]):
    """Batches of rows in a seeded order, resumable mid-epoch through `state_dict` / `load_state_dict`.

    Each epoch is a permutation drawn from `numpy.random.default_rng([seed, epoch])` (identity when
    `shuffle=False`), so any epoch's order can be recomputed without replaying earlier ones. `for batch in loader`
    yields the rest of the current epoch; the next `for` starts the next epoch. `next_batch()` rolls over epochs on
    its own, for loops counted in steps. The state counts batches already yielded: restoring it in a fresh loader
    over the same data continues with the next batch, in the same order.
    """

    def __init__(
        self,
        dataset: _RowSource[RowT],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy's SeedSequence rejects negatives), got {seed}")
        if drop_last and batch_size > len(dataset):
            raise ValueError(
                f"batch_size={batch_size} is larger than the dataset ({len(dataset)} rows), so drop_last=True leaves "
                f"no batch; lower batch_size or set drop_last=False"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.batches_done_in_epoch = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        full, remainder = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or remainder == 0 else full + 1

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row positions in the order epoch `epoch` visits them."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        size = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(size) if self.shuffle else np.arange(size)
        self._order_cache = (epoch, order)
        return order

    def next_batch(self) -> list[RowT]:
        """The next batch, moving to the next epoch when this one is done."""
        if self.batches_done_in_epoch >= len(self):
            self.epoch += 1
            self.batches_done_in_epoch = 0
        order = self.epoch_order(self.epoch)
        start = self.batches_done_in_epoch * self.batch_size
        positions = order[start : start + self.batch_size]
        self.batches_done_in_epoch += 1
        return [self.dataset[int(position)] for position in positions]

    def __iter__(self) -> Iterator[list[RowT]]:
        if self.batches_done_in_epoch >= len(self):
            self.epoch += 1
            self.batches_done_in_epoch = 0
        while self.batches_done_in_epoch < len(self):
            yield self.next_batch()

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "batches_done_in_epoch": self.batches_done_in_epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "num_rows": len(self.dataset),
        }

    def load_state_dict(self, state: Mapping[str, int | bool]) -> None:
        """Continue from a saved state; the order settings and dataset size must match, or the order would differ."""
        current = self.state_dict()
        different = {
            key: (state.get(key), current[key])
            for key in ("seed", "shuffle", "batch_size", "drop_last", "num_rows")
            if state.get(key) != current[key]
        }
        if different:
            details = ", ".join(f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in different.items())
            raise ValueError(
                f"PromptLoader state does not match this loader ({details}); resuming would visit rows in a different "
                f"order, so build the loader with the saved settings over the same data"
            )
        epoch, done = int(state["epoch"]), int(state["batches_done_in_epoch"])
        if epoch < 0 or not 0 <= done <= len(self):
            raise ValueError(
                f"PromptLoader state has epoch={epoch}, batches_done_in_epoch={done}; expected done <= {len(self)}"
            )
        self.epoch = epoch
        self.batches_done_in_epoch = done
