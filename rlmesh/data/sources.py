"""Reading rows from parquet, jsonl, datasets saved to disk, or the Hugging Face hub."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow.parquet as pq

T = TypeVar("T")

if TYPE_CHECKING:
    import datasets

PARQUET_SUFFIXES = (".parquet",)
JSON_SUFFIXES = (".jsonl", ".json")


class UnreadableRow:
    """Stands in for a row that could not be decoded, so it is reported by index like any other malformed row."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def read_rows(source: str | os.PathLike[str], *, split: str = "train", hub_config: str | None = None) -> list[Any]:
    """All rows of one source, as dicts (or `UnreadableRow` for a jsonl line that is not valid JSON).

    - a `.parquet` file, or a directory of them (read in name order);
    - a `.jsonl` file (one JSON object per line; blank lines are skipped), or a `.json` file holding a list;
    - a directory written by `datasets.save_to_disk` (a Dataset, or a DatasetDict from which `split` is taken);
    - otherwise, a hub dataset name for `datasets.load_dataset(source, hub_config, split=split)`.
    """
    path = Path(source)
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        return _read_directory(path, split)
    if path.suffix in PARQUET_SUFFIXES + JSON_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"prompt data file {str(source)!r} does not exist")
    try:
        return load_hub_dataset(str(source), split=split, hub_config=hub_config).to_list()
    except Exception as error:
        raise FileNotFoundError(
            f"{str(source)!r} is not a local file or directory, and loading it from the Hugging Face hub failed "
            f"({type(error).__name__}: {error}); check the path, or the dataset name and your network"
        ) from error


def load_disk_or_hub(source: str | os.PathLike[str], hub_config: str | None = None) -> datasets.DatasetDict:
    """A DatasetDict from a `save_to_disk` directory (a lone Dataset becomes split "train") or from the hub."""
    import datasets

    path = Path(source)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    if path.exists():
        raise ValueError(f"{str(source)!r} is a file; pass a directory written by datasets' save_to_disk or a hub name")
    loaded_from_hub = datasets.load_dataset(str(source), hub_config)
    if not isinstance(loaded_from_hub, datasets.DatasetDict):
        raise TypeError(f"datasets.load_dataset({str(source)!r}) returned {type(loaded_from_hub).__name__}")
    return loaded_from_hub


def load_hub_dataset(name: str, *, split: str, hub_config: str | None = None) -> datasets.Dataset:
    import datasets

    loaded = datasets.load_dataset(name, hub_config, split=split)
    if not isinstance(loaded, datasets.Dataset):
        raise TypeError(f"datasets.load_dataset({name!r}, split={split!r}) returned {type(loaded).__name__}")
    return loaded


def _read_file(path: Path) -> list[Any]:
    if path.suffix in PARQUET_SUFFIXES:
        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(
                f"{str(path)!r} is not a readable parquet file ({type(error).__name__}: {error}); it may be truncated "
                "or corrupted: write it again (scripts/make_synthetic_data.py, scripts/prepare_gsm8k.py)"
            ) from error
    if path.suffix == ".jsonl" or (path.suffix == ".json" and not _starts_with(path, "[")):
        return _read_json_lines(path)
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        return list(rows)
    raise ValueError(
        f"cannot read prompt data from {str(path)!r}: unknown suffix {path.suffix!r}; use .parquet, .jsonl or .json, "
        f"or a directory written by datasets' save_to_disk"
    )


def _read_json_lines(path: Path) -> list[Any]:
    # Line by line on purpose: pyarrow's JSON reader fails the whole file on one bad line or on a field whose type
    # changes between rows, and the datasets reader silently coerces such a field ("1" became 1). Here each row keeps
    # its own types and a bad line is reported by its index.
    rows: list[Any] = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                rows.append(
                    UnreadableRow(f"line {line_number} is not valid JSON ({error.msg} at column {error.colno})")
                )
    return rows


def _read_directory(path: Path, split: str) -> list[Any]:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KeyError(f"dataset at {str(path)!r} has splits {list(loaded)}, not {split!r}; pick one of them")
            loaded = loaded[split]
        return loaded.to_list()
    parquet_files = sorted(path.glob("*.parquet"))
    if parquet_files:
        return [row for file in parquet_files for row in _read_file(file)]
    raise ValueError(
        f"directory {str(path)!r} holds neither a dataset saved by datasets' save_to_disk nor .parquet files "
        f"(it has {sorted(child.name for child in path.iterdir())[:10]})"
    )


def _starts_with(path: Path, character: str) -> bool:
    with path.open(encoding="utf-8") as text:
        while chunk := text.read(64):
            stripped = chunk.lstrip()
            if stripped:
                return stripped.startswith(character)
    return False


def progress(items: Iterable[T], description: str, total: int | None, unit: str = "row") -> Iterable[T]:
    """`items` with a progress bar on a terminal (tqdm, on stderr) when there are more than a few; as is otherwise."""
    import sys

    from tqdm import tqdm

    if not sys.stderr.isatty() or (total is not None and total < 4):
        return items
    return tqdm(items, desc=description, total=total, unit=unit, leave=False)
