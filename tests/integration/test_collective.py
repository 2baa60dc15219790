"""Collective groups spanning meshes on real Ray: broadcast a state dict mesh-to-mesh, all-reduce, and failures."""

from __future__ import annotations

import time

import pytest
import ray

from rlmesh.mesh import ActorMesh, CollectiveError, create_collective_group
from tests.integration.mesh_actors import Peer

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def meshes(ray_cluster):
    trainer = ActorMesh(Peer, 2, args=(3.0,), resources={"CPU": 0.25}, name="trainer")
    rollout = ActorMesh(Peer, 2, args=(0.0,), resources={"CPU": 0.25}, name="rollout", distributed_env=False)
    yield trainer, rollout
    trainer.shutdown()
    rollout.shutdown()


def test_trainer_rank0_broadcasts_a_state_dict_to_every_rollout_actor(meshes):
    trainer, rollout = meshes
    group = create_collective_group([trainer[0], rollout], backend="gloo", name="weights", timeout_s=30)
    try:
        assert group.world_size == 3
        shapes = {"embed": [4, 8], "head": [8]}
        sender = trainer[0].broadcast_state.call_one("weights", 0, shapes)
        receivers = rollout.broadcast_state.all("weights", 0, shapes)
        assert sender.result(timeout=30) == {"embed": 96.0, "head": 24.0}
        assert receivers.result(timeout=30) == [{"embed": 96.0, "head": 24.0}] * 2
    finally:
        group.destroy()


def test_an_actor_can_belong_to_several_groups(meshes):
    trainer, rollout = meshes
    a = create_collective_group([trainer, rollout], name="all4", timeout_s=30)
    b = create_collective_group([trainer[1], rollout[1]], name="pair", timeout_s=30)
    try:
        both = [trainer.all_reduce.all("all4"), rollout.all_reduce.all("all4")]  # issue both before waiting
        assert [v for f in both for v in f.result(timeout=30)] == [6.0] * 4
        pair = [trainer[1].all_reduce.call_one("pair"), rollout[1].all_reduce.call_one("pair")]
        assert [f.result(timeout=30) for f in pair] == [3.0, 3.0]
    finally:
        a.destroy()
        b.destroy()


def test_an_operation_with_a_missing_peer_times_out_with_an_error(meshes):
    trainer, rollout = meshes
    group = create_collective_group([trainer[0], rollout[0]], name="lonely", timeout_s=3)
    try:
        t0 = time.monotonic()
        with pytest.raises(ray.exceptions.RayTaskError, match="all_reduce in collective group 'lonely'"):
            trainer[0].all_reduce.call_one("lonely").result(timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        group.destroy()


def test_a_group_with_a_dead_member_fails_to_form_naming_it(ray_cluster):
    alive = ActorMesh(Peer, 1, args=(1.0,), resources={"CPU": 0.25}, name="alive")
    doomed = ActorMesh(Peer, 2, args=(1.0,), resources={"CPU": 0.25}, name="doomed")
    try:
        ray.kill(doomed.actors[1])
        t0 = time.monotonic()
        with pytest.raises(CollectiveError, match=r"rank 2 \(doomed\{dp=1\} \(rank 1\)\)"):
            create_collective_group([alive, doomed], name="broken", timeout_s=3)
        assert time.monotonic() - t0 < 30
    finally:
        alive.shutdown()
        doomed.shutdown()
