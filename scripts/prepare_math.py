"""Write MATH (problem/solution, boxed answers) or DAPO-Math-17k (verl rows) as verl-format parquet files."""

import argparse
import logging
from collections.abc import Sequence

from rlmesh.data.prepare import MATH_DATA_SOURCE, prepare_math


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--local_dir", default="data/math", help="where <split>.parquet files go")
    parser.add_argument(
        "--source",
        default=MATH_DATA_SOURCE,
        help="hub name (e.g. DigitalLearningGmbH/MATH-lighteval, BytedTsinghua-SIA/DAPO-Math-17k) or a save_to_disk "
        "directory",
    )
    parser.add_argument("--format", dest="data_format", choices=["auto", "math", "dapo"], default="auto")
    parser.add_argument("--hub_config", default=None, help="hub dataset config name, if it has several")
    parser.add_argument("--splits", nargs="*", default=None, help="splits to convert (default: all)")
    parser.add_argument(
        "--keep_duplicates",
        action="store_true",
        help="keep rows whose prompt repeats an earlier one (the hub DAPO-Math-17k repeats each prompt ~100x)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = prepare_math(
        args.local_dir,
        args.source,
        data_format=args.data_format,
        hub_config=args.hub_config,
        splits=args.splits,
        dedupe_prompts=not args.keep_duplicates,
    )
    for split, path in written.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
