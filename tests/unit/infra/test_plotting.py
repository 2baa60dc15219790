"""`rlmesh plot`: reading rlmesh and verl metrics, the panels drawn, overlays and labels, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlmesh.cli import main
from rlmesh.plotting import parse_jsonl, parse_verl_console, plot_runs, read_run, runs_figure

VERL_CONSOLE = """\
(TaskRunner pid=123) Training Progress:   0%|          | 0/3
(TaskRunner pid=123) step:1 - actor/pg_loss:-0.012 - critic/score/mean:0.25 - timing_s/gen:1.5 - name:ppo
(TaskRunner pid=123) step:2 - actor/pg_loss:-0.010 - critic/score/mean:0.375 - timing_s/gen:1.25
some other line: with a colon
step:3 - critic/score/mean:0.5 - val-core/gsm8k/acc/mean@1:0.4
"""


def test_verl_console_lines_become_steps_and_other_lines_are_skipped():
    records = parse_verl_console(VERL_CONSOLE)
    assert sorted(records) == [1, 2, 3]
    assert records[1] == {"actor/pg_loss": -0.012, "critic/score/mean": 0.25, "timing_s/gen": 1.5}  # no 'name'
    assert records[3]["val-core/gsm8k/acc/mean@1"] == 0.4


def test_jsonl_in_rlmesh_and_verl_layouts():
    flat = '{"step": 2, "critic/score/mean": 0.5, "note": "x"}\nnot json\n{"no_step": 1}\n'
    nested = '{"step": 4, "data": {"critic/score/mean": 0.75, "actor/entropy": 1.0}}\n'
    assert parse_jsonl(flat) == {2: {"critic/score/mean": 0.5}}
    assert parse_jsonl(nested) == {4: {"critic/score/mean": 0.75, "actor/entropy": 1.0}}


def write_run(folder: Path, rewards: list[float]) -> Path:
    folder.mkdir()
    lines = [
        {"step": step, "critic/score/mean": reward, "timing_s/gen": 1.0, "timing_s/update_actor": 0.5}
        for step, reward in enumerate(rewards, start=1)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_runs_overlay_by_name_on_the_panels_some_run_has_data_for(tmp_path: Path):
    ours = read_run(write_run(tmp_path / "rlmesh-grpo", [0.1, 0.2, 0.3]))
    verl_log = tmp_path / "verl-grpo.log"
    verl_log.write_text(VERL_CONSOLE)
    theirs = read_run(verl_log)
    assert ours[0] == "rlmesh-grpo" and theirs[0] == "verl-grpo"
    figure = runs_figure([ours, theirs])
    titles = [axis.get_title() for axis in figure.axes if axis.get_visible()]
    assert titles[:2] == ["reward (critic/score/mean)", "validation accuracy"]
    assert "time per step by phase (s): rlmesh-grpo" in titles and "entropy" not in titles  # no run logged entropy
    reward_axis = figure.axes[0]
    assert [line.get_label() for line in reward_axis.get_lines()] == ["rlmesh-grpo", "verl-grpo"]
    out = plot_runs([tmp_path / "rlmesh-grpo", verl_log], tmp_path / "out" / "both.png", labels=["a", "b"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="2 runs"):
        plot_runs([verl_log, verl_log], tmp_path / "x.png", labels=["only one"])


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--help"]) == 0 and "rlmesh plot RUN" in capsys.readouterr().out
    assert main([]) == 2 and main(["fly"]) == 2
    run_dir = write_run(tmp_path / "run", [0.1, 0.2])
    assert main(["plot", str(run_dir), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()
    with pytest.raises(SystemExit) as stopped:  # a folder that is no run: argparse's error, exit 2
        main(["plot", str(tmp_path / "missing")])
    assert stopped.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_a_steps_phases_take_the_longest_of_calls_issued_together_and_leave_out_nested_timers():
    from rlmesh.plotting import step_phases

    record = {
        "timing_s/gen": 2.0,
        "timing_s/wait_next_gen": 0.5,
        "timing_s/reward": 0.3,  # reward, reference and old log-probs are issued together
        "timing_s/ref": 0.7,
        "timing_s/old_log_prob": 0.6,
        "timing_s/update_actor": 1.0,
        "timing_s/update_weights": 0.4,
        "timing_s/sync_transfer": 0.35,  # inside update_weights
        "timing_s/step": 5.0,
    }
    phases = step_phases(record)
    assert phases == {
        "generate": 2.5,
        "score, ref, old log-probs, values": 0.7,
        "update": 1.0,
        "weight sync": 0.4,
    }
    assert sum(phases.values()) <= record["timing_s/step"]
