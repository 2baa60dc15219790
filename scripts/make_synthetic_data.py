"""Writes a synthetic task (arithmetic, countdown, digit_sort) as verl-format train.parquet and test.parquet.

    python scripts/make_synthetic_data.py --task arithmetic --digits 2 --operators + --out_dir data/arithmetic
    python scripts/make_synthetic_data.py --task countdown --num_numbers 4 --train_size 20000

Only the difficulty flags that are given are passed on, so each task keeps its own defaults; a flag the task does
not have is an error that lists the task's settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlmesh.data.synthetic import DEFAULT_HELD_OUT_FRACTION, TASKS, make_task_rows

# Flags that set a task's difficulty; each maps to the task dataclass field of the same name.
DIFFICULTY_FLAGS: dict[str, type] = {
    "digits": int,
    "operators": str,
    "num_operands": int,
    "prompt_style": str,
    "num_numbers": int,
    "max_number": int,
    "max_target": int,
    "length": int,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="arithmetic")
    parser.add_argument("--train_size", type=int, default=5000)
    parser.add_argument("--test_size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default=None, help="default: data/<task>")
    parser.add_argument(
        "--held_out_fraction",
        type=float,
        default=DEFAULT_HELD_OUT_FRACTION,
        help="share of all problems reserved for the test split",
    )
    group = parser.add_argument_group("difficulty (each task uses its own; see rlmesh/data/synthetic.py)")
    for flag, flag_type in DIFFICULTY_FLAGS.items():
        group.add_argument(f"--{flag}", type=flag_type, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    difficulty = {flag: getattr(args, flag) for flag in DIFFICULTY_FLAGS if getattr(args, flag) is not None}
    out_dir = Path(args.out_dir or f"data/{args.task}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", args.train_size), ("test", args.test_size)):
        rows = make_task_rows(args.task, size, args.seed, split, held_out_fraction=args.held_out_fraction, **difficulty)
        path = out_dir / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        print(f"wrote {len(rows)} {split} rows to {path}")
        if rows:
            print(json.dumps(rows[0]))
    return out_dir


if __name__ == "__main__":
    main()
