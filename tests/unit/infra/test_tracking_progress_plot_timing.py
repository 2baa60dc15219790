"""ProgressBar output (rich, plain lines, disabled), the reward/validation PNG, step timers and per-rank reduction."""

import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from matplotlib.lines import Line2D
from rich.console import Console

from rlmesh import tracking
from rlmesh.tracking import ProgressBar, curves_figure, plot_curves, read_metrics, timed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def terminal(buffer: io.StringIO) -> Console:
    return Console(file=buffer, force_terminal=True, width=120)


def test_disabled_progress_bar_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    buffer = io.StringIO()
    for console in (terminal(buffer), Console(file=buffer), None):
        with ProgressBar(total_steps=3, enabled=False, console=console, plain_every_s=0) as bar:
            for step in (1, 2, 3):
                bar.update(step, {"critic/score/mean": 0.5})
    assert buffer.getvalue() == ""
    assert capsys.readouterr() == ("", "")


def test_rich_bar_shows_step_reward_validation_and_eta() -> None:
    buffer = io.StringIO()
    with ProgressBar(total_steps=10, initial_step=4, console=terminal(buffer)) as bar:
        bar.update(5, {"critic/score/mean": 0.5, "val-core/arith/acc/mean@1": 0.25})
        bar.update(6, {"critic/score/mean": 0.75})  # no validation this step: the last value stays on screen
    shown = buffer.getvalue()
    assert "6/10" in shown and "reward 0.750" in shown and "val 0.250" in shown and "eta" in shown


def test_non_terminal_falls_back_to_plain_periodic_lines() -> None:
    buffer = io.StringIO()
    bar = ProgressBar(total_steps=4, console=Console(file=buffer), plain_every_s=3600)
    for step in (1, 2, 3, 4):
        bar.update(step, {"critic/score/mean": step / 10, "val-core/a/acc/mean@1": 0.5, "val-core/b/acc/mean@4": 0.0})
    bar.close()
    printed = buffer.getvalue().splitlines()
    assert len(printed) == 2  # the first update, then nothing until the last step
    assert printed[0].startswith("step 1/4 | reward 0.100 | val 0.250 (mean of 2 sources) | elapsed ")
    assert printed[1].startswith("step 4/4 | reward 0.400") and printed[1].endswith("eta 0:00:00")
    assert "\x1b" not in buffer.getvalue()  # no escape codes in a log file


def test_log_lines_print_above_a_live_bar_instead_of_through_it(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("test_tracking_progress.bar_routing")
    handler = logging.StreamHandler(sys.stderr)  # made before the bar, like Hydra's console handler
    log.addHandler(handler)
    log.propagate = False
    buffer = io.StringIO()
    try:
        with ProgressBar(total_steps=2, console=terminal(buffer)) as bar:
            log.warning("a line from the loop")
            bar.update(1)
        assert handler.stream is sys.stderr  # put back after close
    finally:
        log.removeHandler(handler)
    assert "a line from the loop" in buffer.getvalue()
    assert "a line from the loop" not in capsys.readouterr().err


def write_metrics(path: Path, records: list[dict[str, float | int | None]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def sparse_validation_run(tmp_path: Path) -> Path:
    records: list[dict[str, float | int | None]] = []
    for step in range(1, 7):
        records.append({"step": step, "critic/score/mean": step / 10, "actor/pg_loss": 0.1})
        if step % 2 == 0:
            records[-1]["val-core/arith/acc/mean@1"] = step / 20  # validation every 2nd step only
    records[3]["val-core/countdown/acc/mean@4"] = 0.3  # a second source validated once
    records[3]["val-core/arith/reward/mean@1"] = 9.0  # not an accuracy: not drawn
    records.append({"step": 5, "critic/score/mean": 0.55})  # step 5 logged again after a resume: the last one counts
    return write_metrics(tmp_path / "metrics.jsonl", records)


def points(line: Line2D) -> tuple[list[float], list[float]]:
    return np.asarray(line.get_xdata()).tolist(), np.asarray(line.get_ydata()).tolist()


def test_figure_draws_reward_and_every_validation_series(sparse_validation_run: Path) -> None:
    figure = curves_figure(read_metrics(sparse_validation_run))
    reward_axes, val_axes = figure.axes
    (reward_line,) = reward_axes.get_lines()
    assert points(reward_line) == ([1, 2, 3, 4, 5, 6], [0.1, 0.2, 0.3, 0.4, 0.55, 0.6])
    drawn = {line.get_label(): points(line) for line in val_axes.get_lines()}
    assert drawn == {"arith/acc/mean@1": ([2, 4, 6], [0.1, 0.2, 0.3]), "countdown/acc/mean@4": ([4], [0.3])}


def test_plot_curves_writes_a_png(sparse_validation_run: Path, tmp_path: Path) -> None:
    out = plot_curves(sparse_validation_run, tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000  # a drawn figure, not an empty canvas


def test_plot_curves_before_any_validation(tmp_path: Path) -> None:
    metrics = write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "critic/score/mean": 0.2}])
    assert plot_curves(metrics, tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
    (_, val_axes) = curves_figure(read_metrics(metrics)).axes
    assert val_axes.get_lines() == [] and "no val-core/" in val_axes.texts[0].get_text()


def test_plot_curves_errors_name_the_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics_jsonl=.*metrics\.jsonl"):
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "out.png")
    metrics = write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "reward/mean": 0.2}])
    with pytest.raises(ValueError, match=r"reward_key='critic/score/mean'.*\['reward/mean'\]"):
        plot_curves(metrics, tmp_path / "out.png")


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    ticks = iter(range(0, 1000, 2))  # every perf_counter() call advances 2 s
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: float(next(ticks)))
    yield


@pytest.mark.usefixtures("fake_clock")
def test_timed_adds_seconds_under_timing_s_and_accumulates() -> None:
    metrics: dict[str, float] = {}
    with timed(metrics, "gen") as timer:  # enter at t=0
        assert timer.elapsed == 2.0  # live while the block runs (t=2)
    assert metrics == {"timing_s/gen": 4.0}  # exit at t=4
    with timed(metrics, "gen"):  # t=6 to t=8: a second round in the same step adds up
        pass
    with pytest.raises(RuntimeError), timed(metrics, "reward"):  # t=10 to t=12, recorded although it raised
        raise RuntimeError("scorer crashed")
    assert metrics == {"timing_s/gen": 6.0, "timing_s/reward": 2.0}
