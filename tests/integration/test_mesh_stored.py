"""StoredRows on a real local Ray: row views the controller splits and joins without the data, fetched by the actors
that take them; in_store calls whose results stay in the store; and the store worker."""

from __future__ import annotations

import os

import pytest
import ray
import torch

from rlmesh.data import Batch
from rlmesh.mesh import ActorMesh, StoredRows, endpoint, run_stored

pytestmark = pytest.mark.usefixtures("ray_cluster")


def numbered(rows: int, offset: int = 0) -> Batch:
    values = torch.arange(offset, offset + rows, dtype=torch.float32)
    return Batch({"x": values[:, None].repeat(1, 3)}, {"tag": [f"r{int(v)}" for v in values]})


def gather_with_missing(parts: list[Batch]) -> Batch:
    """A collect that fills a field some parts lack (as the reward role's does for a scorer's extras)."""
    keys = {key for part in parts for key in part.non_tensors}
    for part in parts:
        for key in keys - set(part.non_tensors):
            part[key] = [None] * len(part)
    return Batch.concat(parts)


class Worker:
    @endpoint
    def double(self, batch: Batch) -> Batch:
        return Batch({"y": batch["x"] * 2}, {"seen_by": [os.getpid()] * len(batch)})

    @endpoint
    def row_count(self, batch: Batch) -> int:
        return len(batch)

    @endpoint
    def drop_a_row(self, batch: Batch) -> Batch:
        return batch[1:]

    @endpoint(collect=gather_with_missing)
    def flag_first_shard(self, batch: Batch) -> Batch:
        out = Batch({"z": batch["x"][:, 0]})
        if batch["x"][0, 0] == 0:  # only the first shard has this field
            out["first"] = [True] * len(batch)
        return out


class AsyncWorker:
    @endpoint
    async def samples(self, n: int) -> list[int]:
        return list(range(n))

    @endpoint
    async def total(self, batch: Batch) -> float:
        return float(batch["x"].sum())


@pytest.fixture(scope="module")
def workers():
    mesh = ActorMesh(Worker, shape={"dp": 2}, resources={"CPU": 0.1}, name="stored-workers")
    single = ActorMesh(AsyncWorker, shape=1, resources={"CPU": 0.1}, name="stored-async")
    yield mesh, single
    mesh.shutdown()
    single.shutdown()


def test_row_views_select_join_and_add_columns_without_the_controller_touching_rows():
    first, second = StoredRows.put(numbered(4)), StoredRows.put(numbered(3, offset=4))
    joined = StoredRows.concat([first, second])
    assert len(joined) == 7
    assert joined.fetch()["x"][:, 0].tolist() == list(range(7))
    picked = joined[[6, 0, 3, 4, 4]]  # across both stored values, out of order, with a repeat (shard padding)
    assert picked.fetch()["tag"] == ["r6", "r0", "r3", "r4", "r4"]
    mask = torch.tensor([True, False] * 3 + [True])
    assert joined[mask].fetch()["x"][:, 0].tolist() == [0, 2, 4, 6]
    assert joined[2:5].fetch()["x"][:, 0].tolist() == [2, 3, 4]
    extra = StoredRows.put(Batch({"x": torch.full((7, 3), -1.0), "w": torch.ones(7)}))
    merged = joined.with_columns(extra).fetch()
    assert merged["x"][0].tolist() == [-1.0, -1.0, -1.0] and merged["tag"][0] == "r0"  # the later group wins
    with pytest.raises(ValueError, match="cannot add columns of 2 rows"):
        joined.with_columns(StoredRows.put(numbered(2)))
    with pytest.raises(IndexError, match="out of range"):
        joined[[7]]


def test_shard_splits_a_view_and_in_store_results_stay_in_rows_order(workers):
    mesh, _ = workers
    rows = StoredRows.put(numbered(5))  # 5 rows over 2 shards: the second gets a padding row
    assert mesh.row_count.shard(rows).result() == [3, 3]  # ints are not rows: gathered as a list
    out = mesh.double.in_store(lambda b: b["seen_by"]).shard(rows).result()
    assert len(out.rows) == 5  # the padding row is dropped
    assert len(set(out.summary)) == 2 and len(out.summary) == 5  # each actor summarised its own shard
    doubled = rows.with_columns(out.rows).fetch()
    assert doubled["y"][:, 0].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert doubled["tag"] == ["r0", "r1", "r2", "r3", "r4"]


def test_a_result_that_does_not_line_up_with_its_rows_is_named(workers):
    mesh, _ = workers
    with pytest.raises(ValueError, match="'drop_a_row' returned 1 rows for a shard of 2"):
        mesh.drop_a_row.in_store().shard(StoredRows.put(numbered(4))).result()


def test_the_pieces_of_a_sharded_result_join_with_the_endpoints_collect(workers):
    mesh, _ = workers
    out = mesh.flag_first_shard.in_store().shard(StoredRows.put(numbered(4))).result()
    fetched = out.rows.fetch()  # Batch.concat alone refuses parts with different fields
    assert fetched["first"] == [True, True, None, None]


def test_async_actors_take_views_and_keep_results_in_the_store(workers):
    _, single = workers
    assert single.total.choose(StoredRows.put(numbered(3))).result() == pytest.approx(3 * (0 + 1 + 2))
    stored = single.samples.in_store().choose(4).result()
    assert stored.summary is None and len(stored.rows) == 4
    assert StoredRows.concat([stored.rows, stored.rows[1:3]]).fetch() == [0, 1, 2, 3, 1, 2]


def sums_and_rows(batch: Batch, scale: float) -> tuple[Batch, dict[str, float]]:
    return Batch({"scaled": batch["x"] * scale}), {"sum": float(batch["x"].sum())}


def failing(batch: Batch) -> tuple[Batch, None]:
    raise ValueError(f"no good: {len(batch)} rows")


def test_the_store_worker_runs_whole_batch_functions_next_to_the_data():
    rows = StoredRows.concat([StoredRows.put(numbered(2)), StoredRows.put(numbered(2, offset=2))])
    done = run_stored(sums_and_rows, rows, 0.5).result()
    assert done.summary == {"sum": 3.0 * (0 + 1 + 2 + 3)}
    assert done.rows.fetch()["scaled"][:, 0].tolist() == [0.0, 0.5, 1.0, 1.5]
    with pytest.raises(ValueError, match="no good: 4 rows"):  # the function's own error type and message
        run_stored(failing, rows).result()


def test_a_result_without_rows_cannot_stay_in_the_store(workers):
    mesh, _ = workers
    with pytest.raises(TypeError, match="needs rows"):
        mesh[0].row_count.in_store().call_one(StoredRows.put(numbered(2))).result()


def test_views_pickle_as_references_not_data():
    big = StoredRows.put(Batch({"x": torch.zeros(4096, 1024)}))  # 16 MB
    assert len(ray.cloudpickle.dumps(big[:2048])) < 1024  # one reference and a row range, not 8 MB of rows
    every_other = big[list(range(0, 4096, 2))]  # 2,048 one-row pieces: still under 1% of the rows' 8 MB
    assert len(ray.cloudpickle.dumps(every_other)) < 80_000


def test_joining_column_groups_needs_a_merge():
    plain = StoredRows.put([1, 2]).with_columns(StoredRows.put([3, 4]))
    with pytest.raises(TypeError, match="no merge"):
        plain.fetch()
