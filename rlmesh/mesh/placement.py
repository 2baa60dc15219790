"""Placement: one placement-group bundle per actor, PACK or SPREAD, shareable so two meshes can colocate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class PlacementError(RuntimeError):
    """Resources a mesh asked for cannot be met."""


@dataclass
class Placement:
    """A placement group with one bundle per actor position. Pass the same Placement to several meshes to
    put their actors on the same bundles (each actor then asks for a fraction of its bundle)."""

    group: PlacementGroup
    bundles: list[dict[str, float]]
    strategy: str
    owned: bool = True

    @staticmethod
    def create(
        n_bundles: int, bundle: Mapping[str, float], strategy: str = "PACK", timeout_s: float = 60.0
    ) -> Placement:
        """Reserve `n_bundles` copies of `bundle`, failing with a clear message if they cannot be met in time."""
        if strategy not in STRATEGIES:
            raise ValueError(f"placement strategy {strategy!r} is unknown; use one of {STRATEGIES}")
        bundle = {k: float(v) for k, v in bundle.items() if v}
        if not bundle:
            raise ValueError("a placement bundle needs at least one positive resource, e.g. {'CPU': 1}")
        _check_feasible(n_bundles, bundle, strategy)
        group = placement_group([dict(bundle) for _ in range(n_bundles)], strategy=strategy)
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(group)
            raise PlacementError(
                f"could not reserve {n_bundles} × {bundle} ({strategy}) within {timeout_s:.0f}s; the cluster has "
                f"{_summary(ray.available_resources())} available of {_summary(ray.cluster_resources())}. "
                "Ask for fewer resources per actor, fewer actors, or add nodes."
            )
        return Placement(group, [dict(bundle) for _ in range(n_bundles)], strategy)

    def strategy_for(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=index, placement_group_capture_child_tasks=False
        )

    def node_ids(self) -> list[str]:
        """The node each bundle landed on, by bundle index."""
        table: dict[str, Any] = ray.util.placement_group_table(self.group)
        by_index = table["bundles_to_node_id"]
        return [by_index[i] for i in range(len(self.bundles))]

    def remove(self) -> None:
        if self.owned:
            remove_placement_group(self.group)


def _check_feasible(n_bundles: int, bundle: Mapping[str, float], strategy: str) -> None:
    """Fail at once for requests no node could ever hold, instead of waiting out the timeout."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in nodes]
    total_fit = sum(
        min(int(node.get(k, 0.0) // v) for k, v in bundle.items())
        for node in nodes
        if all(v > 0 for v in bundle.values())
    )
    problem = None
    if not any(fits):
        problem = f"no node can hold one bundle {dict(bundle)}"
    elif strategy == "STRICT_SPREAD" and sum(fits) < n_bundles:
        problem = f"STRICT_SPREAD needs {n_bundles} nodes that each hold {dict(bundle)}, the cluster has {sum(fits)}"
    elif total_fit < n_bundles:
        problem = f"the whole cluster holds at most {total_fit} bundles of {dict(bundle)}, {n_bundles} were asked for"
    if problem:
        raise PlacementError(
            f"{problem}; cluster resources: {_summary(ray.cluster_resources())}. "
            "Lower the per-actor resources or the mesh size, or give Ray more (num_cpus=, num_gpus=)."
        )


def _summary(resources: Mapping[str, float]) -> str:
    skip = ("node:", "memory", "object_store", "bundle_group_")
    keep = {k: round(v, 2) for k, v in resources.items() if not k.startswith(skip) and "_group_" not in k}
    return str(keep)
