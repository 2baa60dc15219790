"""The `rlmesh` command: `rlmesh train|eval [overrides]` (python -m rlmesh.train|eval), `rlmesh plot RUN [RUN ...]`,
`rlmesh export CHECKPOINT OUT` and `rlmesh from-verl COMMAND`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = """usage:
  rlmesh train [hydra overrides ...]   train, as python -m rlmesh.train (recipe=NAME key=value, --help, --cfg job)
  rlmesh eval [PATH] [overrides ...]   evaluate a run, checkpoint or HF model folder (eval.checkpoint=PATH), as
                                       python -m rlmesh.eval: mean@k, pass@k, maj@k on the validation data
  rlmesh plot RUN [RUN ...] [-o OUT]   overlay runs' curves: rlmesh run folders, metrics jsonl, verl logs
  rlmesh export CHECKPOINT OUT         a checkpoint's policy as a clean Hugging Face folder (transformers, vLLM)
  rlmesh from-verl [COMMAND | -f FILE] a verl command line translated into an rlmesh one, unmapped keys reported"""


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


def export_command(argv: Sequence[str]) -> int:
    from rlmesh.export import export_checkpoint

    parser = argparse.ArgumentParser(
        prog="rlmesh export",
        description="Write a checkpoint's policy as a Hugging Face folder: safetensors weights, config, tokenizer and "
        "generation config, loadable by AutoModelForCausalLM and vLLM; no optimizer state.",
    )
    parser.add_argument("checkpoint", help="a run folder (its latest checkpoint), a checkpoint step_N, or an HF folder")
    parser.add_argument("out", help="the folder to create (must not exist, or be empty)")
    parser.add_argument("--dtype", help="cast the weights, e.g. bfloat16 (default: as trained)")
    args = parser.parse_args(list(argv))
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {out}")
    return 0


def from_verl_command(argv: Sequence[str]) -> int:
    from rlmesh.from_verl import key_table, translate

    parser = argparse.ArgumentParser(
        prog="rlmesh from-verl",
        description="Translate a verl command line (python3 -m verl.trainer.main_ppo key=value ...) or a "
        "ppo_trainer.yaml override list into an rlmesh command. Prints the command on stdout, and on stderr each "
        "verl key it cannot map and why.",
    )
    parser.add_argument("words", nargs="*", help="the verl command, quoted as one string or as its words")
    parser.add_argument("-f", "--file", help="read the command from a shell script (line continuations are fine)")
    parser.add_argument("--table", action="store_true", help="print the verl-to-rlmesh key table (markdown)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any key cannot be mapped")
    args = parser.parse_args(list(argv))
    if args.table:
        print(key_table())
        return 0
    if args.file:
        command: str | list[str] = Path(args.file).read_text()
    elif len(args.words) == 1:
        command = args.words[0]
    elif args.words:
        command = list(args.words)
    else:
        parser.error("give a verl command (its words or one quoted string) or -f FILE")
    result = translate(command)
    print(result.command())
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for key, why in result.unmapped:
        print(f"not mapped: {key}: {why}", file=sys.stderr)
    return 1 if args.strict and result.unmapped else 0


def hydra_command(module: str, argv: list[str]) -> int:
    """Run a Hydra entry point (rlmesh.train or rlmesh.eval) with `argv` as its command line."""
    import importlib

    if module == "eval" and argv and "=" not in argv[0] and not argv[0].startswith("-"):
        argv = [f"eval.checkpoint={argv[0]}", *argv[1:]]  # rlmesh eval PATH [overrides]
    entry = importlib.import_module(f"rlmesh.{module}")
    sys.argv = [f"rlmesh {module}", *argv]  # Hydra reads the overrides from sys.argv
    entry.main()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in ("train", "eval"):
        return hydra_command(command, rest)
    if command == "plot":
        return plot_command(rest)
    if command == "export":
        return export_command(rest)
    if command == "from-verl":
        return from_verl_command(rest)
    print(f"rlmesh: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
