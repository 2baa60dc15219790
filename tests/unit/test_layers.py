"""The layer rules of DESIGN.md: each package imports only packages below it, and the pure ones pull in no runtime."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rlmesh"

# Bottom first. A package may import only packages of a strictly lower layer (and itself).
LAYERS: list[set[str]] = [
    {"wire", "spans"},  # zero-copy tensor pickling, shared by the mesh and the Batch; the process's trace spans
    {"mesh"},  # the actor-mesh runtime; knows nothing about RL
    {"data"},
    {"reward", "envs"},  # pure python: scoring; environments, tools and multi-turn token buffers
    {"algo"},
    {"config", "checkpoint", "metrics", "tracking", "models"},
    {
        "batch_stages",
        "plotting",
        "from_verl",
        "rollout_dump",
    },  # the store worker's whole-batch functions; plot, from-verl
    {"sync"},
    {"engine"},
    {"roles"},
    {"plan"},  # the role table: reads the role classes
    {"recovery", "config_checks"},
    {"sampling"},  # generation requests and their scores: what the loop trains on and `rlmesh eval` measures
    {"loop", "run_summary"},  # the run; what it says when it starts and ends
    {"train", "export"},  # `rlmesh export`: a checkpoint as a clean Hugging Face folder
    {"eval"},  # `rlmesh eval`: starts the rollout and reward meshes as train does
    {"cli"},  # `rlmesh train|eval|plot|export`: dispatches to the commands
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def rlmesh_imports(path: Path) -> set[str]:
    """The top-level rlmesh packages a module imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from rlmesh import data` imports rlmesh.data: the package is in the names, not the module
            names = [f"rlmesh.{a.name}" for a in node.names] if node.module == "rlmesh" else [node.module]
        found |= {name.split(".")[1] for name in names if name.startswith("rlmesh.")}
    return found


def package_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def test_every_package_has_a_layer() -> None:
    packages = {package_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert packages - set(RANK) == set(), "add the new package to LAYERS"


def test_each_package_imports_only_the_layers_below_it() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = package_of(path)
        if own not in RANK:
            continue
        for imported in rlmesh_imports(path) - {own}:
            if RANK.get(imported, len(LAYERS)) >= RANK[own]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports rlmesh.{imported}")
    assert upward == []


def modules_after_import(package: str) -> set[str]:
    """sys.modules after importing `package` in a fresh interpreter (this one has everything loaded already)."""
    code = f"import json, sys, {package}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("package", ["rlmesh.algo", "rlmesh.reward", "rlmesh.data", "rlmesh.envs"])
def test_pure_packages_import_no_runtime(package: str) -> None:
    loaded = {name.split(".")[0] for name in modules_after_import(package)}
    assert loaded & {"ray", "vllm", "transformers"} == set()


def test_the_mesh_imports_no_rl_package_of_ours() -> None:
    ours = {name for name in modules_after_import("rlmesh.mesh") if name.startswith("rlmesh.")}
    assert {name.split(".")[1] for name in ours} <= {"mesh", "wire", "spans"}


def test_the_mesh_module_does_not_import_the_controller_side_of_collectives():
    """collective.py forms groups over meshes; mesh.py needs only this process's side (process_groups.py)."""
    tree = ast.parse((PACKAGE / "mesh" / "mesh.py").read_text())
    imported = {
        f"{node.module}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not any("collective" in name for name in imported), sorted(imported)
