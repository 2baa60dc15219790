"""CheckpointManager: atomic commit by rename, failures that publish nothing, keep_last pruning, latest, resume."""

from pathlib import Path

import pytest

from rlmesh.checkpoint import COMPLETE_MARKER, LATEST_MARKER, CheckpointManager


def commit_step(manager: CheckpointManager, step: int, content: str = "weights") -> Path:
    staging = manager.staging(step)
    (staging / "actor").mkdir()
    (staging / "actor" / "model.safetensors").write_text(f"{content} {step}")
    return manager.commit(staging, step)


def names(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


def test_staging_is_hidden_until_commit_renames_it_to_the_step_folder(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    staging = manager.staging(12)
    assert staging.parent == manager.root and staging.name.startswith(".tmp-step_000012-")
    (staging / "model.safetensors").write_text("w")
    assert manager.latest() is None and manager.checkpoints() == []  # written but not committed: not a checkpoint

    final = manager.commit(staging, 12)

    assert final == manager.root / "step_000012"
    assert not staging.exists()
    assert (final / "model.safetensors").read_text() == "w"
    assert (final / COMPLETE_MARKER).is_file()
    assert (manager.root / LATEST_MARKER).read_text().strip() == "step_000012"
    assert manager.latest() == final
    assert names(manager.root) == [LATEST_MARKER, "step_000012"]  # no temp files left behind


def test_a_failure_between_staging_and_commit_publishes_nothing(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    first = commit_step(manager, 1)

    with pytest.raises(RuntimeError, match="role died"), manager.saving(2) as folder:
        (folder / "half_written.bin").write_text("x")
        raise RuntimeError("role died while saving")

    assert not (tmp_path / "step_000002").exists()
    assert manager.latest() == first
    assert names(tmp_path) == [LATEST_MARKER, "step_000001"]  # saving() aborted its staging folder

    # A crash (no abort) leaves the staging folder behind: still not a checkpoint, and removed at the next start.
    crashed = manager.staging(3)
    (crashed / COMPLETE_MARKER).write_text("{}")  # even a temp folder that looks complete does not count
    assert manager.latest() == first and manager.checkpoints() == [first]
    assert CheckpointManager(tmp_path, keep_last=3).clean_stale() == [crashed]
    assert names(tmp_path) == [LATEST_MARKER, "step_000001"]


def test_saving_commits_when_the_block_succeeds(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    with manager.saving(5) as folder:
        (folder / "state.json").write_text("{}")
    assert manager.latest() == tmp_path / "step_000005"
    assert (tmp_path / "step_000005" / "state.json").is_file()


def test_keep_last_prunes_the_oldest_steps(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 5):
        commit_step(manager, step)
    assert names(tmp_path) == [LATEST_MARKER, "step_000003", "step_000004"]
    assert manager.latest() == tmp_path / "step_000004"


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path: Path) -> None:
    # A run resumed from an earlier step commits a step below ones left from before; that one must survive.
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (4, 5):
        commit_step(manager, step)
    resumed = commit_step(manager, 2)
    assert resumed.is_dir()
    assert names(tmp_path) == [LATEST_MARKER, "step_000002", "step_000005"]
    assert manager.latest() == resumed  # the marker wins over the highest step


def test_committing_an_existing_step_replaces_it_whole(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    commit_step(manager, 3, content="old")
    (tmp_path / "step_000003" / "only_in_old.txt").write_text("stale")
    final = commit_step(manager, 3, content="new")
    assert (final / "actor" / "model.safetensors").read_text() == "new 3"
    assert not (final / "only_in_old.txt").exists()
    assert names(tmp_path) == [LATEST_MARKER, "step_000003"]


def test_latest_ignores_incomplete_folders_temp_folders_and_a_dangling_marker(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    committed = commit_step(manager, 1)
    (tmp_path / "step_000009").mkdir()  # e.g. copied by hand, never committed
    (tmp_path / "step_000009" / "model.safetensors").write_text("w")
    stale = tmp_path / ".tmp-step_000010-abcd"
    stale.mkdir()
    (stale / COMPLETE_MARKER).write_text("{}")
    assert manager.latest() == committed
    assert manager.checkpoints() == [committed]

    commit_step(manager, 2)
    (tmp_path / LATEST_MARKER).write_text("step_000007\n")  # names a folder that is gone
    assert manager.latest() == tmp_path / "step_000002"  # falls back to the highest committed step

    manager.clean_stale()
    assert not stale.exists()
    assert (tmp_path / "step_000009").is_dir()  # clean_stale only touches .tmp-* leftovers


def test_resolve_resume_modes(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert manager.resolve_resume("auto") is None  # nothing saved yet: a fresh start, not an error
    final = commit_step(manager, 4)
    assert manager.resolve_resume("auto") == final
    assert manager.resolve_resume("never") is None
    assert manager.resolve_resume(str(final)) == final


def test_resolve_resume_errors_name_the_key_the_value_and_the_fix(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    final = commit_step(manager, 4)

    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as missing_error:
        manager.resolve_resume(missing)
    message = str(missing_error.value)
    assert "trainer.resume" in message and missing in message
    assert f"trainer.resume={final}" in message and "trainer.resume=auto" in message

    incomplete = tmp_path / "ckpt" / "step_000008"
    incomplete.mkdir()
    with pytest.raises(ValueError) as incomplete_error:
        manager.resolve_resume(str(incomplete))
    message = str(incomplete_error.value)
    assert "trainer.resume" in message and str(incomplete) in message
    assert COMPLETE_MARKER in message and "trainer.resume=auto" in message

    with pytest.raises(ValueError, match="checkpoint root") as root_error:
        manager.resolve_resume(str(manager.root))
    assert f"trainer.resume={final}" in str(root_error.value)

    with pytest.raises(ValueError, match=r"trainer\.resume=''"):
        manager.resolve_resume("")


def test_keep_last_below_one_is_rejected_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"trainer.keep_last=0.*trainer.keep_last>=1"):
        CheckpointManager("unused", keep_last=0)


def test_abort_and_commit_refuse_anything_but_a_staging_folder(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    final = commit_step(manager, 1)
    with pytest.raises(ValueError, match="not a staging folder"):
        manager.abort(final)
    assert final.is_dir()
    staging = manager.staging(2)
    manager.abort(staging)
    assert not staging.exists()
    with pytest.raises(FileNotFoundError, match="staging"):
        manager.commit(staging, 2)
