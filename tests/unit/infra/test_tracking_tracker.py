"""Tracker: metrics.jsonl lines, TensorBoard scalars, console lines, non-finite values, resume, wandb on request."""

import json
import logging
import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rlmesh.tracking import METRICS_FILE, TENSORBOARD_DIR, Tracker, read_metrics


def lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_jsonl_has_one_sorted_line_per_step(tmp_path: Path) -> None:
    with Tracker(tmp_path, ["jsonl"], project="p", experiment="e", config={}) as tracker:
        tracker.log({"timing_s/step": 1.5, "critic/score/mean": 0.25, "actor/pg_loss": -0.1}, step=1)
        tracker.log({"critic/score/mean": np.float32(0.5), "actor/pg_loss": torch.tensor(0.2)}, step=2)

    raw = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(raw) == 2
    assert list(json.loads(raw[0])) == sorted(json.loads(raw[0]))  # keys sorted, "step" included
    assert lines(tmp_path) == [
        {"step": 1, "actor/pg_loss": -0.1, "critic/score/mean": 0.25, "timing_s/step": 1.5},
        {"step": 2, "actor/pg_loss": pytest.approx(0.2), "critic/score/mean": 0.5},
    ]
    assert not (tmp_path / TENSORBOARD_DIR).exists()  # only the requested backends


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Tracker(tmp_path, ["tensorboard"], project="p", experiment="e", config={"lr": 1e-4}) as tracker:
        for step in (1, 2, 3):
            tracker.log({"critic/score/mean": step / 10, "bad": float("nan")}, step=step)

    events = list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    accumulator = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    accumulator.Reload()
    scalars = accumulator.Scalars("critic/score/mean")
    assert [(event.step, round(event.value, 6)) for event in scalars] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert "bad" not in accumulator.Tags()["scalars"]  # non-finite values are left out, as in jsonl (null)


def test_non_finite_values_become_null_with_one_warning_per_metric(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="rlmesh.tracking"), Tracker(tmp_path, ["jsonl"], "p", "e", {}) as tr:
        tr.log({"actor/grad_norm": float("nan"), "ok": 1.0}, step=1)
        tr.log({"actor/grad_norm": float("inf"), "ok": 2.0}, step=2)
        tr.log({"actor/grad_norm": 3.0, "ok": -math.inf}, step=3)

    assert [line["actor/grad_norm"] for line in lines(tmp_path)] == [None, None, 3.0]
    assert [line["ok"] for line in lines(tmp_path)] == [1.0, 2.0, None]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "actor/grad_norm" in warnings[0] and "step 1" in warnings[0]
    assert "ok" in warnings[1] and "step 3" in warnings[1]


def test_resumed_run_appends_to_the_same_file(tmp_path: Path) -> None:
    with Tracker(tmp_path, ["jsonl"], "p", "e", {}) as tracker:
        tracker.log({"x": 1.0}, step=1)
        tracker.log({"x": 2.0}, step=2)
    with Tracker(tmp_path, ["jsonl"], "p", "e", {}) as tracker:
        tracker.log({"x": 3.0}, step=3)
    assert [line["step"] for line in lines(tmp_path)] == [1, 2, 3]


def test_append_after_a_partial_line_keeps_later_records_readable(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "x": 1.0}\n{"step": 2, "x"')  # killed mid-write
    with Tracker(tmp_path, ["jsonl"], "p", "e", {}) as tracker:
        tracker.log({"x": 2.5}, step=2)
    assert read_metrics(tmp_path / METRICS_FILE) == {1: {"x": 1.0}, 2: {"x": 2.5}}


def test_console_shows_a_compact_selection(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics = {
        "critic/score/mean": 0.5,
        "val-core/arith/acc/mean@1": 0.25,
        "timing_s/step": 2.0,
        "actor/pg_loss": 0.125,
        "actor/lr": 1e-4,
        "timing_s/gen": 1.0,
    }
    with caplog.at_level(logging.INFO, logger="rlmesh.tracking"), Tracker(tmp_path, ["console"], "p", "e", {}) as tr:
        tr.log(metrics, step=3)
    (line,) = [record.getMessage() for record in caplog.records]
    assert line.startswith("step 3 ")
    for shown in ("critic/score/mean=0.5", "val-core/arith/acc/mean@1=0.25", "timing_s/step=2", "actor/pg_loss=0.125"):
        assert shown in line
    assert "actor/lr" not in line and "timing_s/gen" not in line
    assert not (tmp_path / METRICS_FILE).exists()


def test_bad_input_errors_name_the_key_and_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"trainer.logger=.*'mlflow'.*console"):
        Tracker(tmp_path, ["console", "mlflow"], "p", "e", {})
    with Tracker(tmp_path, ["jsonl"], "p", "e", {}) as tracker:
        with pytest.raises(TypeError, match=r"metric response_length=\[1, 2\].*\.item\(\)"):
            tracker.log({"response_length": [1, 2]}, step=1)
        with pytest.raises(ValueError, match="'step' is reserved"):
            tracker.log({"step": 1.0}, step=1)
    with pytest.raises(RuntimeError, match="after close"):
        tracker.log({"x": 1.0}, step=2)


def test_requested_wandb_that_is_not_installed_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail even where it is installed
    with pytest.raises(ImportError, match=r"wandb is not installed.*pip install wandb.*trainer.logger=\[console"):
        Tracker(tmp_path, ["console", "wandb"], "p", "e", {})


def test_wandb_gets_init_finite_metrics_and_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []

    class FakeRun:
        def log(self, metrics: dict[str, float], step: int) -> None:
            calls.append(("log", (metrics, step)))

        def finish(self) -> None:
            calls.append(("finish", None))

    def init(**kwargs: Any) -> FakeRun:
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with Tracker(tmp_path, ["wandb"], project="rlmesh", experiment="run1", config={"lr": 0.1}) as tracker:
        tracker.log({"x": 1.0, "y": float("nan")}, step=4)
    assert calls == [
        ("init", {"project": "rlmesh", "name": "run1", "config": {"lr": 0.1}, "dir": str(tmp_path)}),
        ("log", ({"x": 1.0}, 4)),
        ("finish", None),
    ]
