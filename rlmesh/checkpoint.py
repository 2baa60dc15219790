"""Checkpoint folders: atomic commit by rename, keep-last pruning, resume lookup, controller and rank state, RNGs."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"  # written last, just before the rename: a folder without it was never committed
LATEST_MARKER = "latest"  # names the checkpoint committed last (a folder name relative to the root)
STALE_PREFIX = ".tmp-"  # staging folders and folders on their way out; never a checkpoint
CONTROLLER_STATE_JSON = "state.json"
CONTROLLER_STATE_TORCH = "state.pt"
_STEP_FOLDER = re.compile(r"step_(\d+)")


def step_folder_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_path(path: Path) -> None:
    # Some filesystems (network mounts, some overlays) refuse fsync on a directory; durability there is theirs to give.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and directory under folder, so the rename below never publishes data still in page cache."""
    for directory, _, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(directory) / name)
        _fsync_path(Path(directory))


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f"{STALE_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as tmp_file:
            tmp_file.write(text)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_path(path.parent)


def _remove_tree_atomically(folder: Path, root: Path) -> None:
    # Rename first: a crash halfway through rmtree must not leave a folder that still looks complete.
    doomed = Path(tempfile.mkdtemp(prefix=f"{STALE_PREFIX}removing-{folder.name}-", dir=root))
    os.replace(folder, doomed / folder.name)
    shutil.rmtree(doomed)


def disk_full(err: BaseException) -> str:
    """Why `err` (or an error it was raised from, or a remote one Ray wrapped as text) says the disk is full, or ''."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    for message in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)):
        if message in text:
            return message
    return ""


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def out_of_space(root: Path, previous: Path | None) -> str:
    """Why a save under `root` could not fit, or '': less room left than the last checkpoint took (or than 64 MB
    without one). Writers do not always say so themselves: torch.save on a full disk reports an 'iostream error'."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return ""
    needed = folder_bytes(previous) if previous is not None else 64 << 20
    if free >= needed:
        return ""
    return f"{free / 1e6:.1f} MB free under {root}, and a checkpoint takes {needed / 1e6:.1f} MB"


def is_complete(folder: Path) -> bool:
    """True when folder is a committed checkpoint (holds the COMPLETE marker)."""
    return (folder / COMPLETE_MARKER).is_file()


class CheckpointManager:
    """Checkpoint folders under root: everyone writes into staging(step), then commit(...) publishes it atomically.

    Layout: root/step_000012/ (committed, holds COMPLETE), root/latest (names the last committed folder),
    root/.tmp-* (staging or leftovers of a crash: ignored, removed by clean_stale()).
    """

    def __init__(self, root: str | Path, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(
                f"trainer.keep_last={keep_last}: at least one checkpoint must be kept. "
                "Set trainer.keep_last>=1, or trainer.save_freq=0 to save none."
            )
        self.root = Path(root)
        self.keep_last = keep_last

    def staging(self, step: int) -> Path:
        """A fresh, empty folder inside root for this step's files; publish it with commit() or drop it with abort()."""
        if step < 0:
            raise ValueError(f"checkpoint step={step}: steps are counted from 0. Pass the number of finished steps.")
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{STALE_PREFIX}{step_folder_name(step)}-", dir=self.root))

    def commit(self, staging_path: str | Path, step: int) -> Path:
        """Mark staging complete, flush it, rename it to root/step_NNNNNN, point `latest` at it, prune old ones."""
        staging_path = self._check_staging(staging_path)
        complete = {"step": step, "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (staging_path / COMPLETE_MARKER).write_text(json.dumps(complete) + "\n")
        _fsync_tree(staging_path)

        final = self.root / step_folder_name(step)
        if final.exists():
            # A directory rename cannot replace a non-empty directory; move the old one aside, then drop it.
            displaced = Path(tempfile.mkdtemp(prefix=f"{STALE_PREFIX}replaced-{final.name}-", dir=self.root))
            os.replace(final, displaced / final.name)
            os.replace(staging_path, final)
            shutil.rmtree(displaced)
        else:
            os.replace(staging_path, final)
        _fsync_path(self.root)
        _write_atomically(self.root / LATEST_MARKER, final.name + "\n")
        self._prune(keep=final)
        logger.info("checkpoint committed: %s", final)
        return final

    def abort(self, staging_path: str | Path) -> None:
        """Remove a staging folder whose step failed; committed checkpoints are never touched."""
        shutil.rmtree(self._check_staging(staging_path), ignore_errors=True)

    @contextlib.contextmanager
    def saving(self, step: int) -> Iterator[Path]:
        """`with manager.saving(step) as folder:` write into folder; committed on success, aborted on an exception."""
        staging_path = self.staging(step)
        try:
            yield staging_path
        except BaseException:
            self.abort(staging_path)
            raise
        self.commit(staging_path, step)

    def clean_stale(self) -> list[Path]:
        """Remove .tmp-* leftovers of a crashed run (call once at start, before staging); returns what it removed."""
        if not self.root.is_dir():
            return []
        removed = []
        for leftover in sorted(self.root.glob(f"{STALE_PREFIX}*")):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
        if removed:
            logger.info("removed %d stale checkpoint leftovers under %s", len(removed), self.root)
        return removed

    def checkpoints(self) -> list[Path]:
        """Committed checkpoints, oldest step first."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in self.root.iterdir():
            match = _STEP_FOLDER.fullmatch(folder.name)
            if match and folder.is_dir() and is_complete(folder):
                found.append((int(match.group(1)), folder))
        return [folder for _, folder in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint committed last (per the `latest` marker), else the highest committed step, else None."""
        marker = self.root / LATEST_MARKER
        if marker.is_file():
            named = self.root / marker.read_text().strip()
            # The marker may be stale (e.g. a crash while replacing that very step); the folders are the truth.
            if _STEP_FOLDER.fullmatch(named.name) and named.is_dir() and is_complete(named):
                return named
        committed = self.checkpoints()
        return committed[-1] if committed else None

    def resolve_resume(self, mode: str) -> Path | None:
        """trainer.resume: 'auto' → latest() or None; 'never' → None; otherwise a committed checkpoint folder."""
        if mode == "never":
            return None
        if mode == "auto":
            return self.latest()
        if not mode:
            raise ValueError(
                "trainer.resume='': expected auto, never or a checkpoint folder. "
                f"Use trainer.resume=auto to resume from the latest checkpoint in {self.root}."
            )
        path = Path(mode).expanduser()
        if not path.is_dir():
            hint = self.latest()
            suggestion = (
                f"trainer.resume={hint}" if hint else f"trainer.resume=never (no checkpoint in {self.root} yet)"
            )
            raise FileNotFoundError(
                f"trainer.resume={mode!r}: no such checkpoint folder. "
                f"Pass an existing step folder (e.g. {suggestion}), or trainer.resume=auto for the latest one."
            )
        if not is_complete(path):
            inner_latest = CheckpointManager(path, keep_last=1).latest()
            if inner_latest is not None:
                fix = (
                    f"it looks like a checkpoint root: pass one of its step folders, e.g. trainer.resume={inner_latest}"
                )
            else:
                fix = (
                    f"it has no {COMPLETE_MARKER} marker, so it was never fully written (an interrupted save?). "
                    "Pick a committed step folder, or trainer.resume=auto for the latest committed one"
                )
            raise ValueError(f"trainer.resume={mode!r} is not a committed checkpoint: {fix}.")
        return path

    def _check_staging(self, staging_path: str | Path) -> Path:
        path = Path(staging_path)
        if path.parent.resolve() != self.root.resolve() or not path.name.startswith(STALE_PREFIX):
            raise ValueError(
                f"staging_path={str(path)!r} is not a staging folder of {self.root}: pass the path staging() returned."
            )
        if not path.is_dir():
            raise FileNotFoundError(
                f"staging_path={str(path)!r} does not exist (already committed, aborted, or removed by clean_stale()); "
                "call staging(step) again."
            )
        return path

    def _prune(self, keep: Path) -> None:
        committed = self.checkpoints()
        excess = len(committed) - self.keep_last
        # Oldest steps go first, but never the checkpoint just written (a run resumed from an earlier step may commit
        # a step lower than ones left over from before).
        for folder in [c for c in committed if c != keep][: max(excess, 0)]:
            _remove_tree_atomically(folder, self.root)
            logger.info("checkpoint pruned (trainer.keep_last=%d): %s", self.keep_last, folder)


def _is_json_value(value: Any) -> bool:
    # Strict on purpose: tuples (would come back as lists) and non-finite floats (not JSON) go to torch.save instead,
    # so every value loads back as the same type it was saved as.
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_json_value(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_json_value(item) for key, item in value.items())
    return False


def save_controller_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Write state to folder: JSON-able entries to state.json (readable), the rest (tensors, RNGs) to state.pt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plain = {key: value for key, value in state.items() if _is_json_value(value)}
    rest = {key: value for key, value in state.items() if key not in plain}
    (folder / CONTROLLER_STATE_JSON).write_text(json.dumps(plain, indent=2, sort_keys=True) + "\n")
    if rest:
        torch.save(rest, folder / CONTROLLER_STATE_TORCH)


def load_controller_state(folder: str | Path) -> dict[str, Any]:
    """The dict save_controller_state wrote to folder."""
    folder = Path(folder)
    json_path = folder / CONTROLLER_STATE_JSON
    if not json_path.is_file():
        raise FileNotFoundError(
            f"controller state folder={str(folder)!r} has no {CONTROLLER_STATE_JSON}: it was not written by "
            "save_controller_state. Pass the folder given to save_controller_state (a committed checkpoint's folder)."
        )
    state: dict[str, Any] = json.loads(json_path.read_text())
    torch_path = folder / CONTROLLER_STATE_TORCH
    if torch_path.is_file():
        # weights_only: a checkpoint folder may come from elsewhere; capture_rng keeps its states to tensors and tuples.
        state.update(torch.load(torch_path, map_location="cpu", weights_only=True))
    return state


def save_rank_state(folder: Path, rank: int, state: dict[str, Any]) -> None:
    """Write one data-parallel rank's training state (optimizer, scheduler, RNGs, ...) to `folder/rank{rank}.pt`;
    `state["world_size"]` is what load_rank_state checks on resume."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / f"rank{rank}.pt")


def load_rank_state(folder: Path, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's training state from a checkpoint's `folder/rank{rank}.pt`, checked against the world size."""
    file = folder / f"rank{rank}.pt"
    if not file.is_file():
        raise FileNotFoundError(f"no {file}: the checkpoint lacks this rank's training state (was it fully written?)")
    # weights_only: a checkpoint may come from elsewhere, and a pickle can run code; capture_rng keeps RNG states to
    # tensors and plain tuples so this loads.
    state: dict[str, Any] = torch.load(file, map_location="cpu", weights_only=True)
    if state["world_size"] != world_size:
        raise ValueError(
            f"{folder} was written by {state['world_size']} data-parallel ranks but this mesh has {world_size}; "
            "optimizer states are per rank: resume with the same dp_size"
        )
    return state


def capture_rng() -> dict[str, Any]:
    """The states of python's random, numpy's global RNG, torch's CPU RNG and (if CUDA is in use) every CUDA RNG."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)  # legacy=True always gives the MT19937 tuple
    rng: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's key array as a tensor, so torch.load(weights_only=True) can read it back.
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    # Only if CUDA is already initialised: querying it would otherwise create a CUDA context in a CPU-only controller.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Put back the states capture_rng returned; the next draws equal those that followed the capture."""
    random.setstate(rng["python"])
    name, keys, position, has_gauss, cached_gaussian = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(rng["torch"])
    cuda_states = rng.get("torch_cuda")
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            logger.warning(
                "restoring %d CUDA RNG states on %d visible devices: extra devices keep their current state",
                len(cuda_states),
                torch.cuda.device_count(),
            )
        for device, state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


POLICY_FOLDER = "policy"  # the trainer's weights inside a checkpoint (PolicyTrainer.weights_folder)


def policy_folder(path: str | Path) -> Path:
    """The Hugging Face policy folder that `path` names: an HF model folder itself, a checkpoint (step_N, its
    `policy/` inside), a checkpoints folder or a run folder (its latest committed checkpoint). Raises
    FileNotFoundError saying what was looked for."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / POLICY_FOLDER / "config.json").is_file():
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is a checkpoint that was never committed (no {COMPLETE_MARKER} marker)")
        return path / POLICY_FOLDER
    for root in (path, path / "checkpoints"):
        latest = CheckpointManager(root, keep_last=1).latest()
        if latest is not None:
            return latest / POLICY_FOLDER
    raise FileNotFoundError(
        f"{path}: neither a Hugging Face model folder (config.json), a checkpoint (step_N/{POLICY_FOLDER}), nor a run "
        "or checkpoints folder holding a committed checkpoint"
    )
