"""Write GSM8K (openai/gsm8k, or a local save_to_disk copy) as verl-format parquet: <local_dir>/<split>.parquet."""

import argparse
import logging
from collections.abc import Sequence

from rlmesh.data.prepare import prepare_gsm8k


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--local_dir", default="data/gsm8k", help="where train.parquet and test.parquet go")
    parser.add_argument("--source", default="openai/gsm8k", help="hub name, or a directory from save_to_disk")
    parser.add_argument("--splits", nargs="*", default=None, help="splits to convert (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for split, path in prepare_gsm8k(args.local_dir, source=args.source, splits=args.splits).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
