"""Conversion of GSM8K, MATH and DAPO-Math-17k into verl-format parquet (used by scripts/prepare_*.py)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from rlmesh.data.sources import load_disk_or_hub, progress

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# verl's data_source names, so reward functions and metrics keyed on them match verl runs.
GSM8K_DATA_SOURCE = "openai/gsm8k"
MATH_DATA_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
DAPO_DATA_SOURCE = "math_dapo"
# The instructions verl's examples/data_preprocess appends to each question.
GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."

RowConverter = Callable[[Mapping[str, Any], int, str], dict[str, Any] | None]


def gsm8k_final_answer(answer: str) -> str:
    """The text after the last '####' of a GSM8K answer, with thousands separators removed ("1,000" -> "1000")."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' final-answer marker: {answer[-200:]!r}")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise ValueError(f"GSM8K answer has nothing after '####': {answer[-200:]!r}")
    return final


def gsm8k_row(example: Mapping[str, Any], index: int, split: str) -> dict[str, Any]:
    """A GSM8K example {question, answer} as a verl row."""
    question, answer = example["question"], example["answer"]
    return {
        "data_source": GSM8K_DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{question} {GSM8K_INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": gsm8k_final_answer(answer)},
        "extra_info": {"split": split, "index": index, "question": question, "answer": answer},
    }


def last_boxed_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed x`) in `text`, braces balanced."""
    starts = [match for match in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    if not starts:
        return None
    rest = text[starts[-1].end() :]
    if rest.startswith(" "):
        # "\boxed 5" form: the answer runs to the next "$" or whitespace
        found = re.match(r"\s+([^\s$]+)", rest)
        return found.group(1) if found else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for position, character in enumerate(rest):
        if character == "{":
            depth += 1
        elif character == "}":
            depth -= 1
            if depth == 0:
                return rest[1:position]
    return None  # unbalanced braces: no reliable answer


def math_row(
    example: Mapping[str, Any], index: int, split: str, data_source: str = MATH_DATA_SOURCE
) -> dict[str, Any] | None:
    """A MATH example {problem, solution[, answer, level, type]} as a verl row; None when no answer can be found.

    The ground truth is the `answer` field when present (MATH-500 has one), else the last boxed expression of the
    solution, as verl does.
    """
    answer = example.get("answer") or last_boxed_answer(example["solution"])
    if not answer:
        return None
    extra_info: dict[str, Any] = {"split": split, "index": index}
    for key in ("level", "type", "subject"):
        if key in example:
            extra_info[key] = example[key]
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": f"{example['problem']} {MATH_INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": extra_info,
    }


def dapo_row(example: Mapping[str, Any], index: int, split: str) -> dict[str, Any]:
    """A DAPO-Math-17k row (already verl format: chat prompt, reward_model.ground_truth) checked and kept as is.

    Its prompt carries DAPO's own "Answer: $Answer" instruction, which its reward expects, so none is added.
    """
    prompt = example.get("prompt")
    reward_model = example.get("reward_model")
    if not isinstance(prompt, list) or not prompt or not all(isinstance(m, Mapping) for m in prompt):
        raise ValueError(f"DAPO row {index} needs 'prompt' as a non-empty list of chat messages, got {prompt!r:.120}")
    if not isinstance(reward_model, Mapping) or reward_model.get("ground_truth") in (None, ""):
        raise ValueError(f"DAPO row {index} needs reward_model.ground_truth, got reward_model={reward_model!r:.120}")
    extra_info = dict(example.get("extra_info") or {})
    extra_info.setdefault("split", split)
    return {
        "data_source": example.get("data_source") or DAPO_DATA_SOURCE,
        "prompt": [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt],
        "ability": example.get("ability") or "math",
        "reward_model": {
            "style": reward_model.get("style") or "rule",
            "ground_truth": str(reward_model["ground_truth"]),
        },
        "extra_info": extra_info,
    }


def detect_math_format(column_names: Sequence[str]) -> str:
    """'math' for {problem, solution} columns, 'dapo' for verl-format {prompt, reward_model} columns."""
    columns = set(column_names)
    if {"problem", "solution"} <= columns:
        return "math"
    if {"prompt", "reward_model"} <= columns:
        return "dapo"
    raise ValueError(
        f"cannot tell the math dataset format from its columns {sorted(columns)}: expected problem/solution (MATH) "
        f"or prompt/reward_model (DAPO-Math-17k); pass --format explicitly"
    )


def convert_rows(
    examples: Sequence[Mapping[str, Any]] | Any, convert: RowConverter, split: str, *, dedupe_prompts: bool = False
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Converted rows plus counts {"input", "output", "no_answer", "duplicates"}.

    `dedupe_prompts` keeps the first row of each distinct prompt: the hub's DAPO-Math-17k holds each of its ~17k
    prompts about 100 times (1.79M rows), which would silently weight an epoch 100x.
    """
    rows: list[dict[str, Any]] = []
    seen_prompts: set[tuple[tuple[str, str], ...]] = set()
    counts = {"input": 0, "output": 0, "no_answer": 0, "duplicates": 0}
    total = len(examples) if hasattr(examples, "__len__") else None
    for index, example in enumerate(progress(examples, f"converting {split}", total)):
        counts["input"] += 1
        row = convert(example, index, split)
        if row is None:
            counts["no_answer"] += 1
            continue
        if dedupe_prompts:
            key = tuple((message["role"], message["content"]) for message in row["prompt"])
            if key in seen_prompts:
                counts["duplicates"] += 1
                continue
            seen_prompts.add(key)
        rows.append(row)
    counts["output"] = len(rows)
    return rows, counts


def write_parquet(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    if not rows:
        raise ValueError(f"no rows to write to {str(path)!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def prepare(
    source: str | datasets.DatasetDict,
    local_dir: str | os.PathLike[str],
    convert: RowConverter,
    *,
    hub_config: str | None = None,
    splits: Sequence[str] | None = None,
    dedupe_prompts: bool = False,
) -> dict[str, Path]:
    """Convert every requested split of `source` (hub name, save_to_disk directory, or a loaded DatasetDict) to
    `local_dir/<split>.parquet`."""
    dataset_dict = load_disk_or_hub(source, hub_config) if isinstance(source, str) else source
    wanted = list(splits) if splits else list(dataset_dict)
    unknown = [split for split in wanted if split not in dataset_dict]
    if unknown:
        raise KeyError(f"{source!r} has splits {list(dataset_dict)}, not {unknown}")
    written: dict[str, Path] = {}
    for split in wanted:
        rows, counts = convert_rows(dataset_dict[split], convert, split, dedupe_prompts=dedupe_prompts)
        written[split] = write_parquet(rows, Path(local_dir) / f"{split}.parquet")
        logger.info("%s: %s -> %s", split, counts, written[split])
        if counts["no_answer"]:
            logger.warning("%s: dropped %d rows with no extractable answer", split, counts["no_answer"])
        if counts["duplicates"]:
            logger.warning("%s: dropped %d rows repeating an earlier prompt", split, counts["duplicates"])
    return written


def prepare_gsm8k(
    local_dir: str | os.PathLike[str], source: str = "openai/gsm8k", splits: Sequence[str] | None = None
) -> dict[str, Path]:
    # The hub dataset needs its "main" config; a local save_to_disk copy ignores it.
    return prepare(source, local_dir, gsm8k_row, hub_config="main", splits=splits)


def prepare_math(
    local_dir: str | os.PathLike[str],
    source: str = MATH_DATA_SOURCE,
    *,
    data_format: str = "auto",
    hub_config: str | None = None,
    splits: Sequence[str] | None = None,
    dedupe_prompts: bool = True,
) -> dict[str, Path]:
    """MATH-style (problem/solution) or DAPO-style (verl rows) math data to parquet; `data_format` auto-detects."""
    if data_format not in ("auto", "math", "dapo"):
        raise ValueError(f"data_format={data_format!r}; use 'auto', 'math' or 'dapo'")
    dataset_dict = load_disk_or_hub(source, hub_config)
    if data_format == "auto":
        data_format = detect_math_format(next(iter(dataset_dict.values())).column_names)
    convert: RowConverter = math_row if data_format == "math" else dapo_row
    return prepare(dataset_dict, local_dir, convert, splits=splits, dedupe_prompts=dedupe_prompts)
