"""What a run says when it starts and ends: the start-up estimate per wave, and the best validation score."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from rlmesh.checkpoint import COMPLETE_MARKER
from rlmesh.run_summary import best_validation, end_lines, startup_estimate_s


class VllmLike:
    __module__ = "rlmesh.roles.rollout.vllm"


class Plain:
    __module__ = "rlmesh.roles.trainer"


def plan(*specs: tuple[type, int], device: str = "cpu") -> SimpleNamespace:
    return SimpleNamespace(device=device, roles=[SimpleNamespace(cls=cls, wave=wave) for cls, wave in specs])


def test_the_startup_estimate_costs_each_wave_its_slowest_role_and_the_weights_read():
    assert startup_estimate_s(plan((Plain, 0), (VllmLike, 0)), None) == 20.0  # one wave: the engine
    assert startup_estimate_s(plan((Plain, 0), (VllmLike, 1)), None) == 25.0  # colocated: the engine waits
    assert startup_estimate_s(plan((VllmLike, 0), device="cuda"), 5 * 10**8) == 61.0  # + 1 GB of bf16 weights


def test_the_best_validation_score_is_the_highest_and_earliest():
    rows = [
        {"step": 0, "val-core/a/acc/mean@1": 0.2},
        {"step": 1, "critic/score/mean": 0.5},
        {"step": 2, "val-core/a/acc/mean@1": 0.6, "val-core/a/reward/mean@1": 0.9},
        {"step": 4, "val-core/a/acc/mean@1": 0.6},
    ]
    assert best_validation(rows) == {"metric": "val-core/a/acc/mean@1", "value": 0.6, "step": 2}
    assert best_validation([{"step": 1, "critic/score/mean": 0.5}]) == {}


def test_the_end_summary_names_the_best_score_the_final_checkpoint_and_the_plot(tmp_path: Path):
    rows = [{"step": 0, "val-core/a/acc/mean@1": 0.25}, {"step": 1, "val-core/a/acc/mean@1": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint = tmp_path / "checkpoints" / "step_000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / COMPLETE_MARKER).write_text("")
    lines = end_lines(tmp_path, [{"training/global_step": 1.0}], tmp_path / "curves.png", 90.0)
    assert lines[0] == "1 steps in 1.5 min"
    assert "best val-core/a/acc/mean@1 = 0.5000 at step 1" in lines
    assert f"final checkpoint: {checkpoint}" in lines and f"plot: {tmp_path / 'curves.png'}" in lines
    assert end_lines(tmp_path / "empty", [], None, 1.0)[1] == "no checkpoint written (trainer.save_freq=0)"


def test_the_best_score_skips_values_the_jsonl_wrote_as_null():
    rows = [{"step": 0, "val-core/a/acc/mean@1": None}, {"step": 5, "val-core/a/acc/mean@1": 0.4}]
    assert best_validation(rows) == {"metric": "val-core/a/acc/mean@1", "value": 0.4, "step": 5}
    assert best_validation([{"step": 0, "val-core/a/acc/mean@1": None}]) == {}


def test_overlapping_calls_of_one_actor_go_on_separate_lanes_of_its_track(tmp_path: Path):
    from rlmesh.tracking import write_trace

    spans = [
        {"name": "generate", "start_ns": 0, "end_ns": 5_000_000, "args": {"weight_version": 3}},
        {"name": "generate", "start_ns": 1_000_000, "end_ns": 2_000_000, "args": {}},
        {"name": "generate", "start_ns": 6_000_000, "end_ns": 7_000_000, "args": {}},
    ]
    actor = {"mesh": "rollout", "rank": 1, "coords": {"dp": 1}, "node": "n", "spans": spans}
    controller = [{"name": "gen", "start_ns": 0, "end_ns": 8_000_000, "args": {}}]
    path = write_trace(tmp_path / "t.json", 4, controller, [actor])
    events = json.loads(path.read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X" and e["name"] == "generate"]
    assert [e["tid"] for e in slices] == [1000, 1001, 1000]  # the second overlaps the first: its own lane
    assert slices[0]["args"] == {"step": 4, "rank": 1, "coords": {"dp": 1}, "node": "n", "weight_version": 3}
    assert slices[0]["dur"] == 5000.0  # microseconds
    names = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {"controller", "rollout"}


def test_static_class_and_generator_endpoints_are_not_wrapped_for_tracing():
    from rlmesh.mesh.endpoint import endpoint
    from rlmesh.mesh.mesh import _traceable

    class Role:
        @endpoint
        def plain(self) -> int:
            return 1

        @staticmethod
        @endpoint
        def static() -> int:
            return 2

        @endpoint
        def stream(self):  # type: ignore[no-untyped-def]
            yield 3

    assert _traceable(Role, "plain")
    assert not _traceable(Role, "static") and not _traceable(Role, "stream")
