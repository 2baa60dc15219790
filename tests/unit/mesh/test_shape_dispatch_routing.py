"""Mesh pieces that need no Ray: shapes and slicing, default shard dispatch/collect, and routers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from rlmesh.mesh.dispatch import concat, split_args, unpad
from rlmesh.mesh.endpoint import endpoints_of
from rlmesh.mesh.routed import pull_cap
from rlmesh.mesh.routing import (
    LeastLoadedRouter,
    Load,
    PowerOfTwoRouter,
    RandomRouter,
    RoundRobinRouter,
    StickyRouter,
    make_router,
)
from rlmesh.mesh.shape import Shape, select, slice_by_name
from tests.integration.mesh_actors import AsyncWorker, Worker


def test_shape_forms_and_product():
    assert Shape.of(4).as_dict() == {"dp": 4}
    assert Shape.of((2, 3)).as_dict() == {"dp": 2, "tp": 3}
    shape = Shape.of({"dp": 2, "tp": 2, "pp": 3})
    assert shape.size == 12  # product, not sum
    assert shape.coords(7) == {"dp": 1, "tp": 0, "pp": 1}
    assert all(shape.rank(shape.coords(r)) == r for r in range(12))


@pytest.mark.parametrize("bad", [0, -1, (2, 0), {"dp": -3}, {"dp": 2.5}])
def test_shape_rejects_non_positive_sizes(bad):
    with pytest.raises(ValueError, match="positive int"):
        Shape.of(bad)


def test_select_drops_int_dims_and_keeps_slices():
    shape = Shape.of({"dp": 2, "tp": 3})
    positions = list(range(6))
    sub, pos = select(shape, positions, 1)
    assert sub.as_dict() == {"tp": 3} and pos == [3, 4, 5]
    sub, pos = select(shape, positions, (slice(None), 2))
    assert sub.as_dict() == {"dp": 2} and pos == [2, 5]
    sub, pos = select(shape, positions, (1, 0))
    assert sub.size == 1 and pos == [3]
    sub, pos = slice_by_name(shape, positions, {"tp": slice(0, 2)})
    assert sub.as_dict() == {"dp": 2, "tp": 2} and pos == [0, 1, 3, 4]


def test_select_errors_name_the_problem():
    shape = Shape.of({"dp": 2, "tp": 2})
    with pytest.raises(IndexError, match="out of range for dimension 'dp' of size 2"):
        select(shape, list(range(4)), 2)
    with pytest.raises(ValueError, match=r"unknown mesh dimension\(s\) \['ep'\]"):
        slice_by_name(shape, list(range(4)), {"ep": 0})
    with pytest.raises(IndexError, match="3 parts"):
        select(shape, list(range(4)), (0, 0, 0))


def test_split_pads_uneven_batches_and_unpad_restores_order():
    xs = list(range(7))
    plan = split_args(3, (xs, torch.arange(7), np.arange(7), "scalar"), {})
    assert plan.rows_per_shard == 3 and plan.real_rows == [3, 3, 1]
    lists = [c[0][0] for c in plan.calls]
    assert lists == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]  # the tail repeats the last real row
    assert all(c[0][3] == "scalar" for c in plan.calls)
    assert torch.equal(plan.calls[2][0][1].tensor, torch.tensor([6, 6, 6]))
    assert concat(unpad([c[0][0] for c in plan.calls], plan)) == xs
    assert torch.equal(concat(unpad([c[0][1].tensor for c in plan.calls], plan)), torch.arange(7))
    assert np.array_equal(concat(unpad([c[0][2] for c in plan.calls], plan)), np.arange(7))


def test_split_tensor_shards_pickle_only_their_own_rows():
    big = torch.arange(100_000, dtype=torch.float32)
    plan = split_args(4, (big,), {})
    for i, call in enumerate(plan.calls):
        pickled = pickle.dumps(call[0][0], protocol=5)
        assert len(pickled) < 25_000 * 4 + 1_000  # a torch view would pickle all 400 kB
        assert torch.equal(pickle.loads(pickled), big[i * 25_000 : (i + 1) * 25_000])


def test_split_fewer_rows_than_shards_drops_pure_padding_results():
    plan = split_args(4, ([10],), {})
    assert plan.real_rows == [1, 0, 0, 0]
    assert concat(unpad([c[0][0] for c in plan.calls], plan)) == [10]


def test_split_dicts_and_errors():
    plan = split_args(2, ({"x": torch.ones(4, 2), "ids": [1, 2, 3, 4]},), {"k": 3})
    assert plan.calls[1][0][0]["ids"] == [3, 4] and plan.calls[1][1] == {"k": 3}
    with pytest.raises(ValueError, match="same length"):
        split_args(2, ([1, 2, 3], [1, 2]), {})
    with pytest.raises(ValueError, match="at least one splittable argument"):
        split_args(2, (1, "a"), {})
    with pytest.raises(ValueError, match="not all splittable"):
        split_args(2, ({"x": [1, 2], "lr": 0.1},), {})
    with pytest.raises(ValueError, match="empty batch"):
        split_args(2, ([],), {})


class Rows:
    """A user container following the shard protocol: len, list indexing, and Type.concat."""

    def __init__(self, items: list[int]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: list[int]) -> Rows:
        return Rows([self.items[i] for i in idx])

    @classmethod
    def concat(cls, parts: list[Rows]) -> Rows:
        return Rows([x for p in parts for x in p.items])


def test_split_and_concat_protocol_objects():
    plan = split_args(2, (Rows([1, 2, 3]),), {})
    parts = [c[0][0] for c in plan.calls]
    assert [p.items for p in parts] == [[1, 2], [3, 3]]
    assert concat(unpad(parts, plan)).items == [1, 2, 3]


def test_concat_keeps_scalars_as_a_list():
    assert concat([{"loss": 1.0}, {"loss": 2.0}]) == {"loss": [1.0, 2.0]}
    assert concat([None, None]) is None


def _load(in_flight, available=None, live=None):
    ids = list(range(len(in_flight)))
    return Load(available if available is not None else ids, live if live is not None else ids, in_flight)


def test_least_loaded_picks_min_and_breaks_ties_round_robin():
    router = LeastLoadedRouter()
    assert router.pick(_load([3, 1, 2]), None) == 1
    picks = {router.pick(_load([0, 0, 5]), None) for _ in range(4)}
    assert picks == {0, 1}


def test_power_of_two_never_picks_the_more_loaded_of_its_pair():
    router = PowerOfTwoRouter(seed=0)
    loads = [0, 100]
    assert all(router.pick(_load(loads), None) == 0 for _ in range(50))
    counts = [0] * 4
    for _ in range(400):
        counts[router.pick(_load([0, 0, 0, 0]), None)] += 1
    assert min(counts) > 50  # spreads equal loads


def test_round_robin_and_random_cover_all_available():
    rr = RoundRobinRouter()
    assert [rr.pick(_load([0, 0, 0]), None) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    rnd = RandomRouter(seed=1)
    assert {rnd.pick(_load([0, 0, 0], available=[0, 2]), None) for _ in range(50)} == {0, 2}
    assert rnd.pick(_load([1, 1], available=[]), None) is None


def test_sticky_keeps_key_waits_when_capped_and_moves_when_dead():
    router = StickyRouter(fallback=RoundRobinRouter())
    first = router.pick(_load([0, 0, 0]), "session-a")
    assert all(router.pick(_load([5, 0, 0] if first == 0 else [0, 5, 5]), "session-a") == first for _ in range(5))
    others = [i for i in range(3) if i != first]
    assert router.pick(_load([0, 0, 0], available=others), "session-a") is None  # capped: wait, don't move
    moved = router.pick(_load([0, 0, 0], available=others, live=others), "session-a")
    assert moved in others
    assert router.pick(_load([0, 0, 0], available=others, live=others), "session-a") == moved
    # A released key is forgotten: the next call with it is routed afresh, like a new session.
    router.release("session-a")
    assert "session-a" not in router._owner
    router.release("never-seen")


def test_make_router_accepts_names_objects_and_functions():
    assert isinstance(make_router("least_loaded"), LeastLoadedRouter)
    fn_router = make_router(lambda load, key: load.available[-1])
    assert fn_router.pick(_load([0, 0, 0]), None) == 2
    with pytest.raises(ValueError, match="known routers"):
        make_router("fastest")


def test_power_of_two_beats_random_on_skewed_loads_in_simulation():
    """Balls-into-bins: max load of p2c is far below random's for the same arrivals."""
    for name, router in (("random", RandomRouter(seed=0)), ("p2c", PowerOfTwoRouter(seed=0))):
        loads = [0] * 16
        for _ in range(1600):
            loads[router.pick(_load(loads), None)] += 1
        if name == "random":
            random_max = max(loads)
        else:
            assert max(loads) < random_max


def test_an_undecorated_override_stays_an_endpoint_with_the_base_options():
    from rlmesh.mesh.endpoint import endpoint

    class Base:
        @endpoint(idempotent=False)
        def run(self) -> int:
            return 1

    class Timed(Base):
        async def run(self) -> int:  # type: ignore[override]
            return 2

    spec = endpoints_of(Timed)["run"]
    assert spec.idempotent is False and spec.is_async


def test_the_default_cap_pulls_for_actors_that_run_calls_one_at_a_time():
    assert pull_cap(endpoints_of(Worker).values(), {}) == 2
    assert pull_cap(endpoints_of(Worker).values(), {"max_concurrency": 4}) == 5
    assert pull_cap(endpoints_of(AsyncWorker).values(), {}) is None  # runs many at once: no cap
