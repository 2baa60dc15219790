"""`rlmesh plot`: the main curves of one or more runs in one PNG, from rlmesh run folders or verl's logs."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlmesh.tracking import AGENT_KEYS, METRICS_FILE, read_metrics

Records = dict[int, dict[str, float]]

# verl's console logger: "step:12 - actor/pg_loss:-0.013 - critic/score/mean:0.51 - ..."
VERL_LINE = re.compile(r"(?:^|\s)step:(\d+)\s+-\s+(.*)$")
VERL_PAIR = re.compile(r"([^\s:]+):(\S+)")


@dataclass(frozen=True)
class Panel:
    title: str
    keys: Callable[[str], bool]  # which metrics it draws
    stacked: bool = False  # a stacked area (the first run's only: runs' stacks would hide each other)


def _named(*names: str) -> Callable[[str], bool]:
    return lambda key: key in names


# The step's phases in order, each from the timing_s/ keys it spans. The loop issues a phase's role calls together
# and times each from the same moment, so the phase took the longest of them (their sum would count the overlap).
PHASES: dict[str, tuple[str, ...]] = {
    "generate": ("timing_s/gen", "timing_s/gen_max", "timing_s/wait_next_gen"),
    "score, ref, old log-probs, values": (
        "timing_s/reward",
        "timing_s/ref",
        "timing_s/old_log_prob",
        "timing_s/values",
    ),
    "advantages": ("timing_s/adv",),
    "update": ("timing_s/update_actor", "timing_s/update_critic"),
    "weight sync": ("timing_s/update_weights",),  # sync_transfer is a part of it
    "checkpoint": ("timing_s/save_checkpoint",),
    "validation": ("timing_s/testing",),
}
PHASE_OF = {key: phase for phase, keys in PHASES.items() for key in keys}
SUMMED = {"generate"}  # its keys are sequential waits, not overlapping calls


PANELS = (
    Panel("reward (critic/score/mean)", _named("critic/score/mean")),
    Panel("validation accuracy", lambda key: key.startswith("val-core/") and "/acc/" in key),
    Panel("response length (mean)", _named("response_length/mean")),
    Panel("KL to the old policy (actor/ppo_kl)", _named("actor/ppo_kl", "actor/kl_loss")),
    Panel("entropy", _named("actor/entropy")),
    Panel("grad norm", _named("actor/grad_norm")),
    Panel("rollout vs trainer", _named("rollout_corr/log_ppl_abs_diff", "rollout_corr/k3_kl")),
    Panel("tool use (per episode)", _named(*AGENT_KEYS)),
    Panel("time per step by phase (s)", lambda key: key in PHASE_OF, stacked=True),
)


def step_phases(record: Mapping[str, float]) -> dict[str, float]:
    """A step's seconds per phase (PHASES) from its timing_s/ metrics; phases it did not time are left out."""
    phases = {}
    for phase, keys in PHASES.items():
        values = [record[key] for key in keys if key in record]
        if values:
            phases[phase] = sum(values) if phase in SUMMED else max(values)
    return phases


def parse_verl_console(text: str) -> Records:
    """verl's console lines (`step:N - key:value - ...`) as {step: {key: value}}; other lines are skipped, and so
    are values that are not numbers."""
    records: Records = {}
    for line in text.splitlines():
        match = VERL_LINE.search(line)
        if match is None:
            continue
        values = {}
        for key, raw in VERL_PAIR.findall(match.group(2)):
            try:
                values[key] = float(raw)
            except ValueError:
                continue
        records.setdefault(int(match.group(1)), {}).update(values)
    return records


def parse_jsonl(text: str) -> Records:
    """jsonl metrics, one step a line: rlmesh's flat {"step": N, key: value} or verl's file logger's
    {"step": N, "data": {...}}. Lines that are not JSON objects with a step are skipped."""
    records: Records = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "step" not in row:
            continue
        data = row["data"] if isinstance(row.get("data"), dict) else row
        values = {k: float(v) for k, v in data.items() if k != "step" and isinstance(v, (int, float))}
        records.setdefault(int(row["step"]), {}).update(values)
    return records


def read_run(path: str | Path) -> tuple[str, Records]:
    """(label, records) of a run: an rlmesh run folder (its metrics.jsonl), a jsonl file (rlmesh's or verl's), or a
    verl console log. The label is the folder's name, or the file's stem."""
    path = Path(path)
    if path.is_dir():
        metrics = path / METRICS_FILE
        if not metrics.is_file():
            raise FileNotFoundError(f"{path} is a folder without {METRICS_FILE}: pass an rlmesh run folder")
        return path.name, {
            step: {k: float(v) for k, v in r.items() if v is not None} for step, r in read_metrics(metrics).items()
        }
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder, a metrics jsonl or a verl console log")
    text = path.read_text(errors="replace")
    records = parse_jsonl(text) or parse_verl_console(text)
    if not records:
        raise ValueError(
            f"{path}: no metrics found; expected jsonl lines with a 'step' or verl console lines 'step:N - key:value'"
        )
    return path.stem if path.name != METRICS_FILE else path.parent.name, records


def runs_figure(runs: Sequence[tuple[str, Mapping[int, Mapping[str, float]]]]) -> Any:
    """One panel per PANELS entry that some run has data for, every run overlaid and labelled."""
    from matplotlib.figure import Figure

    panels = [
        (panel, sorted({k for _, records in runs for r in records.values() for k in r if panel.keys(k)}))
        for panel in PANELS
    ]
    panels = [(panel, keys) for panel, keys in panels if keys]
    if not panels:
        raise ValueError("none of the runs logged a metric that a panel draws (critic/score/mean, val-core/..., ...)")
    columns = 2 if len(panels) > 1 else 1
    rows = (len(panels) + columns - 1) // columns
    figure = Figure(figsize=(7 * columns, 3 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (panel, keys) in zip(axes, panels, strict=False):
        axis.set_title(panel.title, fontsize="small")
        axis.grid(alpha=0.3)
        axis.set_xlabel("step")
        if panel.stacked:
            label, records = next(run for run in runs if any(k in r for r in run[1].values() for k in keys))
            by_step = {step: step_phases(r) for step, r in sorted(records.items())}
            by_step = {step: phases for step, phases in by_step.items() if phases}
            names = [phase for phase in PHASES if any(phase in phases for phases in by_step.values())]
            axis.stackplot(
                list(by_step), [[phases.get(name, 0.0) for phases in by_step.values()] for name in names], labels=names
            )
            axis.set_title(f"{panel.title}: {label}", fontsize="small")
        else:
            for label, records in runs:
                for key in keys:
                    points = [(s, r[key]) for s, r in sorted(records.items()) if key in r]
                    if points:
                        name = label if len(keys) == 1 else f"{label}: {key}"
                        axis.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, label=name)
        axis.legend(fontsize="x-small")
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    return figure


def plot_runs(paths: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Overlay the runs at `paths` (see read_run) in one PNG at `out`; `labels` rename them. Returns `out`."""
    runs = [read_run(path) for path in paths]
    if labels:
        if len(labels) != len(runs):
            raise ValueError(f"{len(labels)} labels for {len(runs)} runs: give one label per run, or none")
        runs = [(label, records) for label, (_, records) in zip(labels, runs, strict=True)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs_figure(runs).savefig(out, format="png", dpi=90)
    return out
