"""Metrics out of the controller: console, metrics.jsonl, TensorBoard and wandb; progress bar, step timers, PNG plot."""

from __future__ import annotations

import importlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlmesh import spans

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

BACKENDS = ("console", "jsonl", "tensorboard", "wandb")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REWARD_KEY = "critic/score/mean"
VAL_PREFIX = "val-core/"
AGENT_KEYS = ("tool_calls/per_episode", "num_turns/mean")  # a multi-turn run's tool use
# What a console line shows; an entry ending in "/" matches every key under it. Everything goes to the other backends.
CONSOLE_KEYS = (
    REWARD_KEY,
    VAL_PREFIX,
    "actor/pg_loss",
    "actor/entropy",
    "actor/ppo_kl",
    "critic/vf_loss",
    "response_length/mean",
    "perf/throughput",
    "timing_s/step",
)


def _is_val_accuracy(key: str, val_prefix: str = VAL_PREFIX) -> bool:
    """val-core/<source>/acc/mean@N (and any other accuracy series under the prefix)."""
    return key.startswith(val_prefix) and "/acc/" in key


class Tracker:
    """Writes each step's metrics to the requested backends; one JSON line per step in run_dir/metrics.jsonl."""

    def __init__(
        self,
        run_dir: str | Path,
        backends: Sequence[str],
        project: str,
        experiment: str,
        config: Mapping[str, Any] | None = None,
        console_keys: Sequence[str] = CONSOLE_KEYS,
    ) -> None:
        unknown = [name for name in backends if name not in BACKENDS]
        if unknown:
            raise ValueError(
                f"trainer.logger={list(backends)}: unknown backend(s) {unknown}. "
                f"Pick from {list(BACKENDS)}, e.g. trainer.logger=[console,jsonl,tensorboard]."
            )
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.backends = tuple(dict.fromkeys(backends))
        self.console_keys = tuple(console_keys)
        self._warned_non_finite: set[str] = set()
        self._closed = False
        config = dict(config or {})

        wandb: Any = None
        if "wandb" in self.backends:  # checked first: a missing package fails before any file is opened
            try:
                wandb = importlib.import_module("wandb")
            except ImportError as error:
                raise ImportError(
                    f"trainer.logger={list(backends)} asks for wandb, but wandb is not installed ({error}). "
                    "Install it (pip install wandb), or drop it: trainer.logger=[console,jsonl,tensorboard]."
                ) from error

        self._jsonl: IO[str] | None = None
        if "jsonl" in self.backends:
            # Append: a resumed run continues the same file (plot_curves keeps the last record of a repeated step).
            metrics_path = self.run_dir / METRICS_FILE
            self._jsonl = metrics_path.open("a", encoding="utf-8")
            if _ends_mid_line(metrics_path):
                self._jsonl.write("\n")  # a crash left a partial line: keep our first record off it

        self._tensorboard: Any = None
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter  # imported here: it takes about a second

            self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))
            config_text = json.dumps(config, indent=2, sort_keys=True, default=str)
            self._tensorboard.add_text("config", f"```\n{config_text}\n```", global_step=0)

        self._wandb_run: Any = None
        if wandb is not None:
            self._wandb_run = wandb.init(project=project, name=experiment, config=config, dir=str(self.run_dir))

        if "console" in self.backends and not logger.hasHandlers():
            # A bare script (no Hydra, no logging.basicConfig) would drop INFO lines silently: give them a handler.
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record metrics for step. Values must be numbers (float(), int, numpy or 0-d tensor); NaN/inf become null."""
        if self._closed:
            raise RuntimeError(f"Tracker.log(step={step}) after close(): log every step before closing the tracker.")
        if "step" in metrics:
            raise ValueError(f"metrics['step']={metrics['step']!r}: 'step' is reserved; pass it as log(..., step=).")
        values = {key: self._as_float(key, value) for key, value in metrics.items()}
        finite = {key: value for key, value in values.items() if math.isfinite(value)}
        for key in sorted(values.keys() - finite.keys() - self._warned_non_finite):
            self._warned_non_finite.add(key)
            logger.warning("metric %s=%s at step %d: written as null (warned once per metric)", key, values[key], step)

        if self._jsonl is not None:
            record = {"step": step, **{key: finite.get(key) for key in values}}
            self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
            self._jsonl.flush()  # a crashed or live run keeps every finished step on disk
        if self._tensorboard is not None:
            for key, value in finite.items():
                self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(finite, step=step)
        if "console" in self.backends:
            logger.info(self.console_line(values, step))

    def console_line(self, metrics: Mapping[str, float], step: int) -> str:
        shown = [
            f"{key}={value:.4g}"
            for key, value in sorted(metrics.items())
            if any(key == wanted or (wanted.endswith("/") and key.startswith(wanted)) for wanted in self.console_keys)
        ]
        return " ".join([f"step {step}", *shown])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _as_float(key: str, value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"metric {key}={value!r}: not a number ({type(value).__name__}). Log a float per key; "
                "reduce tensors and lists first (e.g. .mean().item())."
            ) from error


def _ends_mid_line(path: Path) -> bool:
    with path.open("rb") as file:
        if file.seek(0, 2) == 0:
            return False
        file.seek(-1, 2)
        return file.read(1) != b"\n"


class ProgressBar:
    """Step, reward, latest validation accuracy and ETA: a rich bar on a terminal, plain periodic lines otherwise."""

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        console: Console | None = None,
        plain_every_s: float = 30.0,
    ) -> None:
        self.total_steps = total_steps
        self.initial_step = initial_step
        self.enabled = enabled
        self.step = initial_step
        self.reward: float | None = None
        self.val_accuracy: dict[str, float] = {}
        self._plain_every_s = plain_every_s
        self._started = time.perf_counter()
        self._last_plain: float | None = None
        self._console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._rerouted_handlers: list[tuple[logging.StreamHandler[Any], IO[str]]] = []
        if enabled and self._console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]step"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self._console,
                # Steps take seconds to minutes; rich's default 30 s window would leave the ETA blank for slow steps.
                speed_estimate_period=3600.0,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=initial_step, status="")
            self._terminal_streams = (sys.stdout, sys.stderr)
            self._progress.start()
            self._rerouted_handlers = self._route_log_handlers_through_bar()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Show that `step` steps are done; reward and validation accuracy are kept from the last step that had them."""
        if not self.enabled:
            return
        self.step = step
        metrics = metrics or {}
        if REWARD_KEY in metrics:
            self.reward = float(metrics[REWARD_KEY])
        self.val_accuracy |= {key: float(value) for key, value in metrics.items() if _is_val_accuracy(key)}
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=self.status())
            return
        now = time.perf_counter()
        due = self._last_plain is None or now - self._last_plain >= self._plain_every_s
        if due or step >= self.total_steps:
            self._last_plain = now
            self._console.print(self.plain_line(now), highlight=False, markup=False, emoji=False, soft_wrap=True)

    def status(self) -> str:
        parts = []
        if self.reward is not None:
            parts.append(f"reward {self.reward:.3f}")
        if len(self.val_accuracy) == 1:
            parts.append(f"val {next(iter(self.val_accuracy.values())):.3f}")
        elif self.val_accuracy:
            mean = sum(self.val_accuracy.values()) / len(self.val_accuracy)
            parts.append(f"val {mean:.3f} (mean of {len(self.val_accuracy)} sources)")
        return " | ".join(parts)

    def plain_line(self, now: float) -> str:
        elapsed = now - self._started
        done = self.step - self.initial_step
        eta = _clock(elapsed / done * (self.total_steps - self.step)) if done > 0 else "?"
        status = self.status()
        parts = [f"step {self.step}/{self.total_steps}", status, f"elapsed {_clock(elapsed)}", f"eta {eta}"]
        return " | ".join(part for part in parts if part)

    def _route_log_handlers_through_bar(self) -> list[tuple[logging.StreamHandler[Any], IO[str]]]:
        # Handlers made before the bar (Hydra's console handler, ours) hold the real stdout/stderr, and their lines
        # would garble the live bar. rich has swapped sys.stdout/stderr for proxies that print above it: use those.
        proxies = {id(self._terminal_streams[0]): sys.stdout, id(self._terminal_streams[1]): sys.stderr}
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        rerouted = []
        for handler in {h for log in loggers if isinstance(log, logging.Logger) for h in log.handlers}:
            if type(handler) is logging.StreamHandler and id(handler.stream) in proxies:
                proxy = proxies[id(handler.stream)]
                if proxy is not handler.stream:
                    rerouted.append((handler, handler.stream))
                    handler.setStream(proxy)
        return rerouted

    def close(self) -> None:
        for handler, stream in self._rerouted_handlers:
            handler.setStream(stream)
        self._rerouted_handlers = []
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clock(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_metrics(metrics_jsonl: str | Path) -> dict[int, dict[str, float | None]]:
    """metrics.jsonl as {step: record}, steps ascending; a step logged again after a resume keeps its last record."""
    records: dict[int, dict[str, float | None]] = {}
    with Path(metrics_jsonl).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                # A run killed mid-write leaves one partial line; every complete line is still worth plotting.
                logger.warning("%s:%d skipped, not a JSON line (%s)", metrics_jsonl, number, error)
                continue
            records[int(record.pop("step"))] = record
    return dict(sorted(records.items()))


def curves_figure(
    records: Mapping[int, Mapping[str, float | None]],
    reward_key: str = REWARD_KEY,
    val_prefix: str = VAL_PREFIX,
    title: str = "reward and validation accuracy per step",
) -> Figure:
    """Panels sharing the step axis: reward_key on top, every validation accuracy series below, and for a multi-turn
    run (one that logged AGENT_KEYS) the tool calls and turns per episode at the bottom."""
    from matplotlib.figure import Figure  # Figure + Agg canvas directly: no pyplot, no global backend to switch

    agent_keys = [key for key in AGENT_KEYS if any(record.get(key) is not None for record in records.values())]
    figure = Figure(figsize=(8, 8 if agent_keys else 6), layout="constrained")
    axes = figure.subplots(3 if agent_keys else 2, 1, sharex=True)
    reward_axes, val_axes = axes[0], axes[1]
    figure.suptitle(title)
    if agent_keys:
        for key in agent_keys:
            axes[2].plot(*_series(records, key), label=key)
        axes[2].set_ylabel("per episode")
        axes[2].legend(fontsize="small")
        axes[2].grid(alpha=0.3)
        axes[2].set_xlabel("step")

    reward_points = _series(records, reward_key)
    reward_axes.plot(*reward_points, label=reward_key, color="tab:blue")
    reward_axes.set_ylabel("reward")
    reward_axes.set_title(reward_key, fontsize="small")
    reward_axes.grid(alpha=0.3)

    val_keys = sorted({key for record in records.values() for key in record if _is_val_accuracy(key, val_prefix)})
    for key in val_keys:
        # Validation runs every test_freq steps only: plot the steps that have it, with markers so single points show.
        val_axes.plot(*_series(records, key), marker="o", label=key.removeprefix(val_prefix))
    if val_keys:
        val_axes.legend(fontsize="small")
    else:
        val_axes.text(
            0.5, 0.5, f"no {val_prefix}*/acc/* metrics", ha="center", va="center", transform=val_axes.transAxes
        )
    val_axes.set_ylabel("validation accuracy")
    if not agent_keys:
        val_axes.set_xlabel("step")
    val_axes.grid(alpha=0.3)
    return figure


def _series(records: Mapping[int, Mapping[str, float | None]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for step, record in records.items():
        value = record.get(key)
        if value is not None:
            steps.append(step)
            values.append(float(value))
    return steps, values


def plot_curves(
    metrics_jsonl: str | Path,
    out_png: str | Path,
    reward_key: str = REWARD_KEY,
    val_prefix: str = VAL_PREFIX,
) -> Path:
    """Draw reward and validation accuracy per step from metrics.jsonl into a PNG; returns out_png."""
    metrics_jsonl, out_png = Path(metrics_jsonl), Path(out_png)
    if not metrics_jsonl.is_file():
        raise FileNotFoundError(
            f"metrics_jsonl={str(metrics_jsonl)!r} does not exist: pass the run folder's {METRICS_FILE} "
            "(written when trainer.logger includes jsonl)."
        )
    records = read_metrics(metrics_jsonl)
    if not any(record.get(reward_key) is not None for record in records.values()):
        known = sorted({key for record in records.values() for key in record})
        raise ValueError(
            f"reward_key={reward_key!r}: no value in {metrics_jsonl} ({len(records)} steps). "
            f"Pass one of the logged keys: {known[:20]}{' ...' if len(known) > 20 else ''}."
        )
    figure = curves_figure(records, reward_key, val_prefix, title=f"{metrics_jsonl.parent.name}: reward and validation")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, format="png", dpi=100)
    return out_png


class Timer:
    """`with Timer() as timer: ...` then timer.elapsed (seconds, perf_counter); live while the block runs."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._stop: float | None = None

    @property
    def elapsed(self) -> float:
        if self._start is None:
            return 0.0
        return (self._stop if self._stop is not None else time.perf_counter()) - self._start

    def __enter__(self) -> Self:
        self._start, self._stop = time.perf_counter(), None
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = time.perf_counter()


@contextmanager
def timed(metrics: dict[str, float], name: str) -> Iterator[Timer]:
    """Add the block's seconds to metrics[f"timing_s/{name}"]; a name timed twice in a step accumulates (e.g. DAPO's
    regeneration rounds), and the time is recorded even if the block raises. The block is a span of this process
    too (rlmesh.spans)."""
    timer = Timer()
    started = time.time_ns()
    try:
        with timer:
            yield timer
    finally:
        key = f"timing_s/{name}"
        metrics[key] = metrics.get(key, 0.0) + timer.elapsed
        spans.record(name, started, time.time_ns())  # the controller's phases, for the step's trace


def write_trace(
    path: Path, step: int, controller: Sequence[Mapping[str, Any]], actors: Sequence[Mapping[str, Any]]
) -> Path:
    """One step's spans as a Chrome / Perfetto trace (chrome://tracing, ui.perfetto.dev): the controller's phases,
    then one process per mesh with a thread per actor (its rank and coordinates), each span with its args (the
    actor's rank, coordinates and Ray node among them)."""
    events: list[dict[str, Any]] = []
    processes: dict[str, int] = {"controller": 0}

    def add(pid: int, tid: int, span: Mapping[str, Any], args: Mapping[str, Any]) -> None:
        start_us = span["start_ns"] / 1000
        events.append(
            {
                "name": span["name"],
                "ph": "X",
                "ts": start_us,
                "dur": max(span["end_ns"] / 1000 - start_us, 0.0),
                "pid": pid,
                "tid": tid,
                "args": {**args, **span.get("args", {})},
            }
        )

    for span in controller:
        add(0, 0, span, {"step": step})
    for actor in actors:
        pid = processes.setdefault(actor["mesh"], len(processes))
        coords = ",".join(f"{k}={v}" for k, v in actor["coords"].items())
        where = {"step": step, "rank": actor["rank"], "coords": actor["coords"], "node": actor.get("node")}
        # An async actor runs calls at once; overlapping slices of one track do not nest, so each goes on the
        # actor's first lane that is free by its start (thread id rank x 1000 + lane).
        lane_ends: list[int] = []
        for span in sorted(actor["spans"], key=lambda s: s["start_ns"]):
            lane = next((i for i, end in enumerate(lane_ends) if end <= span["start_ns"]), len(lane_ends))
            if lane == len(lane_ends):
                lane_ends.append(0)
                events.append(
                    {
                        "name": "thread_name",
                        "ph": "M",
                        "pid": pid,
                        "tid": actor["rank"] * 1000 + lane,
                        "args": {"name": f"rank {actor['rank']} ({coords})" + (f" #{lane}" if lane else "")},
                    }
                )
            lane_ends[lane] = span["end_ns"]
            add(pid, actor["rank"] * 1000 + lane, span, where)
    for name, pid in processes.items():
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}, default=str))
    tmp.replace(path)
    return path
