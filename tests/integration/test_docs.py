"""docs/ as code: every python block runs, every rlmesh command composes into a valid config (and passes the checks
made before any actor starts, where it needs no GPU), every quoted error message is one rlmesh raises, and the doc's
own reward function trains a step."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlmesh.config import RlmeshConfig, unknown_keys
from rlmesh.config_checks import check_config
from tests.conftest import REPO, SMALL_RUN, compose_config

DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
BLOCK = re.compile(r"(?:<!-- file: (?P<file>[\w./-]+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)\n```", re.DOTALL)
HYDRA_COMMANDS = ("python -m rlmesh.train", "rlmesh train", "python -m rlmesh.eval", "rlmesh eval")


def blocks(page: Path) -> list[tuple[str, str | None, str]]:
    """(language, file name or None, body) of each fenced block of the page."""
    return [(m["lang"], m["file"], m["body"]) for m in BLOCK.finditer(page.read_text())]


def page_folder(page: Path, tmp_path: Path) -> Path:
    """A working folder holding the page's file blocks (what a reader would save before running the rest)."""
    for _, name, body in blocks(page):
        if name:
            (tmp_path / name).write_text(body + "\n")
    return tmp_path


def commands(page: Path) -> list[str]:
    """The page's rlmesh command lines (from bash blocks; comments dropped)."""
    found = []
    for lang, _, body in blocks(page):
        if lang != "bash":
            continue
        for line in body.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(HYDRA_COMMANDS):
                found.append(line)
    return found


def test_the_index_names_every_page_and_every_relative_link_resolves():
    index = (DOCS / "index.md").read_text()
    for page in PAGES:
        if page.name != "index.md":
            assert f"({page.name})" in index, page.name
        for target in re.findall(r"\]\(([\w./-]+\.md)\)", page.read_text()):
            assert (DOCS / target).is_file(), (page.name, target)


@pytest.mark.parametrize("page", [p for p in PAGES if any(lang == "python" and not f for lang, f, _ in blocks(p))])
def test_every_python_block_runs(page: Path, tmp_path: Path):
    folder = page_folder(page, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)  # a block that starts Ray starts its own
    for lang, name, body in blocks(page):
        if lang != "python" or name:
            continue
        done = subprocess.run(
            [sys.executable, "-c", body], cwd=folder, env=env, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, f"{page.name}:\n{body}\n{done.stderr[-3000:]}"


def overrides_of(line: str, folder: Path) -> list[str]:
    words = shlex.split(line)
    words = words[3:] if words[0] == "python" else words[2:]
    if words and "=" not in words[0] and not words[0].startswith("-"):  # rlmesh eval PATH
        words[0] = f"eval.checkpoint={words[0]}"
    # files the page saved are where the reader saved them; sweeps and --cfg are Hydra's own flags
    saved = [w.replace("=my_", f"={folder}/my_") if "custom_reward_function.path" in w else w for w in words]
    flags = {i for i, w in enumerate(saved) if w.startswith("-")} | {i + 1 for i, w in enumerate(saved) if w == "--cfg"}
    return [w for i, w in enumerate(saved) if i not in flags]


COMMAND_PAGES = [p for p in PAGES if commands(p)]


@pytest.mark.parametrize("page", COMMAND_PAGES, ids=[p.name for p in COMMAND_PAGES])
def test_every_command_composes_and_passes_the_checks_where_it_needs_no_gpu(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder = page_folder(page, tmp_path)
    monkeypatch.syspath_prepend(str(folder))  # the page's role and environment classes import by name
    for line in commands(page):
        overrides = [o.replace("recipe=grpo,rloo", "recipe=grpo") for o in overrides_of(line, folder)]
        cfg = compose_config(*overrides)
        assert unknown_keys(cfg) == [], line
        typed: RlmeshConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
        needs_gpu = typed.trainer.n_gpus > 0 or typed.trainer.device == "cuda" or typed.cluster.address
        elsewhere = typed.data.train_files or typed.trainer.replay_rollouts  # a dataset or a dump made beforehand
        if needs_gpu or elsewhere:  # GPUs, a cluster, or files this machine does not have
            continue
        check_config(typed)


def test_the_quoted_error_messages_are_what_rlmesh_raises():
    source = "\n".join(p.read_text() for p in (REPO / "rlmesh").rglob("*.py"))
    table = [line for line in (DOCS / "troubleshooting.md").read_text().splitlines() if line.startswith("| `")]
    assert len(table) >= 10
    for line in table:
        for quoted in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            assert quoted in source, quoted


def test_the_recipes_page_lists_every_recipe():
    page = (DOCS / "recipes.md").read_text()
    for recipe in (REPO / "recipes").glob("*.yaml"):
        assert f"| `{recipe.stem}` |" in page and f"recipe={recipe.stem}" in page, recipe.stem


def train_one_step_as_a_reader(folder: Path, overrides: list[str], out: Path) -> dict[str, float]:
    """`python -m rlmesh.train` with `overrides` on the small run, one step, from `folder` (where the reader saved
    the page's files), in its own Ray; the step's metrics."""
    small = [o for o in SMALL_RUN if not o.startswith("trainer.progress_bar")]  # HF rollout: no engine to start
    command = [sys.executable, "-m", "rlmesh.train", *overrides, *small, "trainer.total_steps=1"]
    command += ["trainer.val_before_train=false", "trainer.logger=[jsonl]", "trainer.progress_bar=false"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [*command, f"trainer.output_dir={out}"], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]


def test_the_docs_reward_function_and_reward_class_train_a_step(tmp_path: Path):
    """As a reader runs them: the two files saved in a folder, the command run from there (its own Ray)."""
    folder = page_folder(DOCS / "rewards-and-environments.md", tmp_path)
    page_folder(DOCS / "swapping-roles.md", tmp_path)
    overrides = [
        "roles.reward.custom_reward_function.path=my_reward.py",
        "roles.reward._target_=my_roles.ShortAnswerReward",
    ]
    metrics = train_one_step_as_a_reader(folder, overrides, tmp_path / "run")
    # the function's extras are logged; the class's length penalty and the function's brevity bonus both apply
    assert "reward/acc/mean" in metrics and "reward/pred" not in metrics
    assert metrics["critic/score/mean"] != metrics["reward/acc/mean"]


def test_the_docs_environment_trains_a_step_through_the_agent_loop(tmp_path: Path):
    """The page's environment class, saved as my_env.py and named by the page's own command, plays a step's
    episodes."""
    folder = page_folder(DOCS / "rewards-and-environments.md", tmp_path)
    (line,) = [c for c in commands(DOCS / "rewards-and-environments.md") if "my_env." in c]
    metrics = train_one_step_as_a_reader(folder, overrides_of(line, folder), tmp_path / "run")
    # every episode ended by the environment's own step (done=True), none by an environment error; the tiny model's
    # calls to `calculate`, a tool this environment does not have, came back as error observations and were counted
    assert metrics["episodes/ended_by/done"] == 1.0 and metrics["episodes/env_errors"] == 0
    assert metrics["tool_calls/errors"] == metrics["tool_calls/count"]
    assert 0.0 <= metrics["critic/score/mean"] <= 1.0
