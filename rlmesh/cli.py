"""The `rlmesh` command: `rlmesh train [overrides]` (python -m rlmesh.train) and `rlmesh plot RUN [RUN ...]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

USAGE = """usage:
  rlmesh train [hydra overrides ...]   train, as python -m rlmesh.train (recipe=NAME key=value, --help, --cfg job)
  rlmesh plot RUN [RUN ...] [-o OUT]   overlay runs' curves: rlmesh run folders, metrics jsonl, verl logs"""


def plot_command(argv: Sequence[str]) -> int:
    from rlmesh.plotting import plot_runs

    parser = argparse.ArgumentParser(
        prog="rlmesh plot",
        description="Overlay the main curves of runs in one PNG: reward, validation accuracy, response length, KL, "
        "entropy, grad norm, rollout-vs-trainer mismatch, tool use, and the first run's time per phase.",
    )
    parser.add_argument("runs", nargs="+", help="rlmesh run folders, metrics jsonl files, or verl console logs/jsonl")
    parser.add_argument("-o", "--out", default="curves.png", help="the PNG to write (default: curves.png)")
    parser.add_argument("--label", action="append", help="a run's label, once per run in order (default: its name)")
    args = parser.parse_args(list(argv))
    try:
        out = plot_runs(args.runs, args.out, args.label)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "train":
        from rlmesh import train

        sys.argv = ["rlmesh train", *rest]  # Hydra reads the overrides from sys.argv
        train.main()
        return 0
    if command == "plot":
        return plot_command(rest)
    print(f"rlmesh: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
