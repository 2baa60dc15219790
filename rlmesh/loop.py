"""The single controller: one PPO/GRPO step, readable top to bottom, with validation, checkpoints and metrics."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from rlmesh import spans
from rlmesh.algo import estimator_needs, make_kl_controller
from rlmesh.batch_stages import (
    UpdateSettings,
    prepare_update,
)
from rlmesh.checkpoint import (
    CheckpointManager,
    capture_rng,
    disk_full,
    load_controller_state,
    out_of_space,
    restore_rng,
    save_controller_state,
)
from rlmesh.config import RlmeshConfig, SamplingConfig
from rlmesh.data import Batch, PromptLoader, PromptRow
from rlmesh.mesh import ActorDiedError, StoredRows, run_stored, wait_all
from rlmesh.metrics import idle_ratio, throughput_metrics, validation_metrics
from rlmesh.recovery import RoleCall, RunFailed, RunInterrupted, SkippedUpdates, StopRequest
from rlmesh.roles.contracts import (
    AgentLoopMesh,
    BusyTimedRolloutMesh,
    PolicyMesh,
    ReferenceMesh,
    RolloutMesh,
    ScorerMesh,
    SleepingRolloutMesh,
    ValueMesh,
)
from rlmesh.roles.rollout.base import sampling_seed
from rlmesh.rollout_dump import dump_step
from rlmesh.sampling import IssuedRollout, Sampler, stateless_call
from rlmesh.sync.transports import WeightSyncError
from rlmesh.tracking import ProgressBar, Tracker, timed, write_trace

log = logging.getLogger(__name__)


class WeightSync(Protocol):
    version: int | None  # what every live engine serves after the last successful push

    def setup(self) -> None: ...
    def push(self, version: int) -> dict[str, float]: ...


@dataclass
class Roles:
    """The meshes one run drives, each typed by its role's contract. Reference and critic are None when the algorithm
    does not use them."""

    trainer: PolicyMesh
    rollout: RolloutMesh
    reward: ScorerMesh
    reference: ReferenceMesh | None
    critic: ValueMesh | None
    weight_sync: WeightSync
    agent: AgentLoopMesh | None = None  # multi-turn: its actors play the episodes, calling the rollout mesh


class RLLoop(Sampler):
    """The training run: PPO/GRPO steps on the roles' meshes, with validation, checkpoints and metrics."""

    def __init__(
        self,
        cfg: RlmeshConfig,
        roles: Roles,
        train_prompts: PromptLoader[PromptRow],
        val_prompts: list[PromptRow],
        pad_token_id: int,
        run_dir: Path,
        tracker: Tracker,
        stop: StopRequest | None = None,
        startup_metrics: dict[str, float] | None = None,
    ) -> None:
        super().__init__(cfg, roles.rollout, roles.reward, roles.agent, pad_token_id)
        self.roles, self.train_prompts, self.val_prompts = roles, train_prompts, val_prompts
        self.run_dir, self.tracker = run_dir, tracker
        self.stop = stop or StopRequest()
        self.startup_metrics = startup_metrics or {}
        self.skipped_updates = SkippedUpdates(cfg.trainer.max_consecutive_skipped_steps)
        self.checkpoints = CheckpointManager(run_dir / "checkpoints", cfg.trainer.keep_last)
        kl = cfg.algorithm.kl_ctrl
        self.kl_ctrl = make_kl_controller(kl.type, kl.kl_coef, kl.target_kl, kl.horizon)
        self.needs = estimator_needs(cfg.algorithm.adv_estimator)
        self.n = cfg.roles.rollout.n
        self.n_devices = cfg.roles.trainer.dp_size
        rollout = cfg.roles.rollout
        # Colocated engines in sleep mode (the plan checked their class against the SleepingRollout contract).
        sleeps = rollout.colocate_with_trainer and rollout.enable_sleep_mode
        self.sleeping = cast("SleepingRolloutMesh", roles.rollout) if sleeps else None
        # How many steps ahead generation runs: a step's batch is issued that many steps before the step that
        # trains it, so its samples are that many versions old at most (admission bounds the staleness).
        mode = cfg.trainer.mode
        self.lookahead = {"sync": 0, "one_step_off": 1}.get(mode, cfg.trainer.asynchronous.max_staleness)
        # The most prompts issued and not yet trained; below the staleness bound's, steps ahead are issued in parts.
        admitted = cfg.data.train_batch_size * (self.lookahead + 1)
        asked = cfg.trainer.asynchronous.buffer_size if mode == "async" else None
        self.buffer_size: int = asked or admitted
        self.finish_before_sync = mode == "one_step_off"  # else (async) syncs land on requests in flight
        self.ahead: dict[int, IssuedRollout] = {}  # issued for a later step than the one running
        # Engines that report their busy time (the BusyTimedRollout contract), and their last readings.
        timed = hasattr(roles.rollout, "busy_time")
        self.timed_engines = cast("BusyTimedRolloutMesh", roles.rollout) if timed else None
        self.engine_clocks: list[dict[str, float]] | None = None
        self.last_step = 0  # fit's total_steps: nothing is issued for a step after it

    # ---------------------------------------------------------------- one step

    def step(self, step: int) -> dict[str, float]:
        """One step. The step's data stays in the object store: the controller holds StoredRows (references to the
        roles' outputs, row by row) and per-sample scalars, and each role fetches its own shard."""
        cfg, roles, metrics = self.cfg, self.roles, {"training/global_step": float(step)}
        t_step = time.perf_counter()
        rollout_faults = roles.rollout.fault_counts()
        # 1. generate n responses per prompt (and score them, when dynamic sampling must filter on the score); with
        #    a lookahead this batch was issued during earlier steps, and the steps up to the lookahead are now
        batch, scored = self.take_rollout(step, metrics)
        if self.sleeping:  # colocated engines hand the GPU to training until the sync: KV cache freed
            self.sleeping.sleep.all(1).result()
        # 2. reward, reference log-probs, old log-probs and values: issued together, awaited together
        issued = time.perf_counter()
        pending = {
            "reward": None if scored else self.score(batch),
            "ref": self.reference_logprobs(batch) if roles.reference else None,
            "old_log_prob": RoleCall("trainer", roles.trainer, roles.trainer.compute_logprobs.in_store().shard(batch))
            if cfg.algorithm.recompute_old_logprobs
            else None,
            "values": RoleCall("critic", roles.critic, roles.critic.compute_values.in_store().shard(batch))
            if roles.critic
            else None,
        }
        for name, call in pending.items():
            if call is not None:
                batch = batch.with_columns(self.wait_timed(call, name, issued, metrics).rows)
        # 3. advantages and the batch's metrics, next to the data
        with timed(metrics, "adv"):
            batch, batch_metrics = self.compute_advantages(batch, step)
        if cfg.trainer.dump_rollouts:
            with timed(metrics, "dump_rollouts"):
                self.dump(step, batch, metrics)
        # 4. critic and policy updates, issued together
        issued = time.perf_counter()
        critic_update = RoleCall("critic", roles.critic, roles.critic.update.shard(batch)) if roles.critic else None
        actor_update = RoleCall("trainer", roles.trainer, roles.trainer.update.shard(batch))  # metrics over ranks
        if critic_update is not None:
            metrics |= self.wait_timed(critic_update, "update_critic", issued, metrics)
        metrics |= self.wait_timed(actor_update, "update_actor", issued, metrics)
        # 5. the rollout engines get the new weights: one_step_off first finishes what was issued meanwhile, so no
        #    sample mixes two versions; async pushes onto requests in flight (they pause, and resume on the new ones)
        if self.finish_before_sync and self.ahead:
            with timed(metrics, "wait_next_gen"):
                wait_all([group for issued in self.ahead.values() for group in issued.groups])
        with timed(metrics, "update_weights"):
            metrics |= self.update_rollout_weights(version=step)
        # 6. metrics, with verl's names
        metrics |= batch_metrics
        after = roles.rollout.fault_counts()  # requests re-issued after their engine died, engines replaced
        metrics["rollout/retried_requests"] = float(after["retried_calls"] - rollout_faults["retried_calls"])
        metrics["rollout/restarted_engines"] = float(after["restarted_actors"] - rollout_faults["restarted_actors"])
        metrics["timing_s/step"] = time.perf_counter() - t_step
        waited = metrics.get("timing_s/gen", 0.0) + metrics.get("timing_s/wait_next_gen", 0.0)
        metrics["trainer/idle_ratio"] = waited / max(metrics["timing_s/step"], 1e-9)  # waiting on generation
        metrics |= self.rollouter_idle()
        metrics |= throughput_metrics(batch_metrics["perf/total_num_tokens"], metrics["timing_s/step"], self.n_devices)
        if cfg.trainer.trace:
            self.write_trace(step)
        return metrics

    def write_trace(self, step: int) -> None:
        """The spans since the last step's trace, the controller's and every role actor's, as traces/step_N.json."""
        roles = self.roles
        actors = []
        for mesh in (roles.trainer, roles.rollout, roles.reward, roles.reference, roles.critic, roles.agent):
            drain = getattr(mesh, "drain_spans", None)
            if drain is not None:
                actors += drain()
        write_trace(self.run_dir / "traces" / f"step_{step:06d}.json", step, spans.drain(), actors)

    def take_rollout(self, step: int, metrics: dict[str, float]) -> tuple[StoredRows[Batch], bool]:
        """This step's batch. With a lookahead, first issue what is not yet of every step up to it, on the engines'
        current weights (the trainer's before this step's update), then wait for this step's: issued ahead, or now.
        Its groups leave the buffer then, which makes room for more of the steps ahead."""
        if self.cfg.trainer.mode == "sync" and step not in self.ahead:
            return self.rollout_batch(step, metrics)
        self.issue_ahead(step, step)
        with timed(metrics, "gen"):  # the wait: the generation itself overlapped the steps before
            batch = self.assemble(self.ahead.pop(step))
        self.issue_ahead(step, step + 1)
        metrics["rollout/groups_ahead"] = float(sum(i.num_groups for i in self.ahead.values()))
        return batch, False

    def issue_ahead(self, step: int, first: int) -> None:
        """Issue, oldest step first, from step `first` to the lookahead's last, as many prompts as the buffer has room
        for; `step`'s own all go. A step's prompts are drawn together, when the first of them is issued."""
        room = self.buffer_size - sum(issued.num_groups for issued in self.ahead.values())
        for later in range(first, min(step + self.lookahead, self.last_step) + 1):
            issued = self.ahead.get(later)
            if issued is None:
                if room <= 0 and later != step:
                    return
                prompts = self.train_prompts.next_batch()
                issued = self.ahead[later] = IssuedRollout(later, prompts, self.n, self.cfg.roles.rollout.sampling, [])
            count = issued.pending if later == step else min(issued.pending, room)
            self.top_up(issued, count)
            room -= count

    def rollouter_idle(self) -> dict[str, float]:
        """rollouter/idle_ratio since the last reading: the engines' share of time with nothing to generate. A
        reading that fails (an engine is down) skips the metric; the next one starts afresh."""
        if self.timed_engines is None:
            return {}
        before = self.engine_clocks
        try:
            self.engine_clocks = self.timed_engines.busy_time.all().result()
        except Exception as err:
            log.debug("no engine busy times this step: %s", err)
            self.engine_clocks = None
            return {}
        ratio = idle_ratio(before, self.engine_clocks) if before is not None else None
        return {} if ratio is None else {"rollouter/idle_ratio": ratio}

    def rollout_batch(self, step: int, metrics: dict[str, float]) -> tuple[StoredRows[Batch], bool]:
        """n samples per prompt, and whether they are scored already. With DAPO's dynamic sampling, keep drawing
        prompts until enough groups have reward variance (groups where every sample scored the same carry no GRPO
        signal)."""
        prompts = self.train_prompts.next_batch()
        dynamic = self.cfg.algorithm.dynamic_sampling
        # Dynamic sampling concatenates several draws, so every draw is padded to the same, maximal widths.
        widths = dynamic.enable
        batch = self.draw(prompts, step, metrics, fixed_widths=widths)
        if not dynamic.enable:
            return batch, False
        wanted, kept, flat, draws = len(prompts) * self.n, [], [], 0
        while True:
            draws += 1
            with timed(metrics, "reward"):
                scored = self.score(batch).result(metrics)
            batch = batch.with_columns(scored.rows)
            varied = varied_groups(scored.summary["sequence_score"], self.n)
            kept.append(batch[varied])
            flat.append(batch[~varied])
            if sum(len(b) for b in kept) >= wanted or draws >= dynamic.max_num_gen_batches:
                break
            batch = self.draw(self.train_prompts.next_batch(), step, metrics, fixed_widths=widths)
        result = StoredRows.concat(kept)
        metrics["dynamic_sampling/gen_batches"] = float(draws)
        metrics["dynamic_sampling/kept_groups"] = float(min(len(result), wanted) // self.n)
        if len(result) < wanted:
            # The step's size is fixed (mini-batches must divide it): top up with flat groups, whose advantages are 0.
            log.warning(
                "dynamic sampling kept %d of %d groups after %d batches", len(result) // self.n, wanted // self.n, draws
            )
            result = StoredRows.concat([result, *flat])
        return result[:wanted], True

    def draw(
        self, prompts: list[PromptRow], step: int, metrics: dict[str, float], fixed_widths: bool
    ) -> StoredRows[Batch]:
        """n samples per prompt. An estimator that needs a greedy baseline (ReMax) also gets one greedy response per
        prompt, scored: its reward is the baseline_rewards of each of that prompt's rows."""
        sampling = self.cfg.roles.rollout.sampling
        with timed(metrics, "gen"):
            batch = self.generate(prompts, self.n, sampling, step, fixed_widths=fixed_widths)
        if self.needs.baseline:
            with timed(metrics, "gen_max"):  # verl's name for ReMax's greedy generation
                greedy = self.generate(prompts, 1, replace(sampling, temperature=0.0), step)
                scores = self.score(greedy).result(metrics).summary["sequence_score"]
            baselines = Batch({"baseline_rewards": scores.repeat_interleave(self.n)})
            batch = batch.with_columns(StoredRows.put(baselines))  # one float per row: the controller's own
        return batch

    def compute_advantages(self, batch: StoredRows[Batch], step: int) -> tuple[StoredRows[Batch], dict[str, float]]:
        """Advantages, KL-penalised rewards and the batch's metrics, computed by the store worker on the whole batch;
        the KL controller (the controller's state) takes the penalty's KL."""
        algo = self.cfg.algorithm
        settings = UpdateSettings(
            adv_estimator=algo.adv_estimator,
            use_kl_in_reward=algo.use_kl_in_reward,
            kl_penalty=algo.kl_penalty,
            kl_coef=self.kl_ctrl.value,
            gamma=algo.gamma,
            lam=algo.lam,
            norm_adv_by_std=algo.norm_adv_by_std_in_grpo,
            recompute_old_logprobs=algo.recompute_old_logprobs,
            rollout_correction=asdict(algo.rollout_correction),
            policy_version=step - 1,
            # an episode's response holds every turn: its cap is the episode's, not one turn's
            max_response_length=self.cfg.roles.agent.max_total_tokens
            if self.roles.agent
            else self.cfg.roles.rollout.sampling.max_tokens,
            max_prompt_length=self.cfg.data.max_prompt_length,
        )
        done = run_stored(prepare_update, batch, settings).result()
        if algo.use_kl_in_reward:
            self.kl_ctrl.update(done.summary["actor/reward_kl_penalty"], n_steps=len(batch))
        return batch.with_columns(done.rows), done.summary

    def update_rollout_weights(self, version: int) -> dict[str, float]:
        """Push the trainer's weights to the engines. Sleeping engines first wake their weights (the sync writes
        into them), and re-allocate their KV cache only after it, so the two never need the GPU at once."""
        if not self.sleeping:
            return self.push_weights(version)
        self.sleeping.wake_up.all(["weights"]).result()
        try:
            metrics = self.push_weights(version)
        except BaseException:
            with contextlib.suppress(Exception):  # the sync's error says more than a wake-up that failed after it
                self.sleeping.wake_up.all(["kv_cache"]).result()
            raise
        self.sleeping.wake_up.all(["kv_cache"]).result()
        return metrics

    def reference_logprobs(self, batch: StoredRows[Batch]) -> RoleCall:
        reference = self.roles.reference
        assert reference is not None
        return stateless_call("reference", reference, lambda: reference.compute_ref_logprobs.in_store().shard(batch))

    def push_weights(self, version: int) -> dict[str, float]:
        """One sync; if it fails (an engine died during it, say), dead engines are replaced and it is tried once more:
        the restart hook gives every engine the weights again, so no engine serves a half-loaded model."""
        try:
            return self.roles.weight_sync.push(version=version)
        except WeightSyncError as err:
            restarted = self.roles.rollout.restart_dead()
            recovered = {"recovery/rollout_restarts": float(len(restarted))}
            if self.roles.weight_sync.version == version:
                log.warning("weight sync %d failed (%s); restarted engines %s took it", version, err, restarted)
                return recovered  # the restart hook already pushed this version to every engine
            log.warning("weight sync %d failed (%s); restarted engines %s, syncing again", version, err, restarted)
            return self.roles.weight_sync.push(version=version) | recovered

    def dump(self, step: int, batch: StoredRows[Batch], metrics: dict[str, float]) -> None:
        """trainer.dump_rollouts: the step's samples with the trainer's log-probs of them before the update (the
        recomputed old log-probs, else one more scoring pass), written by the store worker."""
        trainer_rows = None
        if not self.cfg.algorithm.recompute_old_logprobs:
            scoring = self.roles.trainer.compute_logprobs.in_store().shard(batch)
            trainer_rows = RoleCall("trainer", self.roles.trainer, scoring).result(metrics).rows
        seed_of = partial(sampling_seed, self.seed_base(self.cfg.roles.rollout.sampling))
        folder = self.cfg.trainer.dump_rollouts
        run_stored(dump_step, batch, trainer_rows, folder, step, seed_of, self.cfg.model.path).result()

    def wait_timed(self, call: RoleCall, name: str, issued: float, metrics: dict[str, float]) -> Any:
        """The call's result; its time from `issued` (perf_counter) is timing_s/<name>, and a span of the trace."""
        result = call.result(metrics)
        elapsed = metrics[f"timing_s/{name}"] = time.perf_counter() - issued
        ended = time.time_ns()
        spans.record(name, ended - int(elapsed * 1e9), ended)
        return result

    # ---------------------------------------------------------------- validation

    def validate(self, step: int) -> dict[str, float]:
        rollout = self.cfg.roles.rollout
        if not self.val_prompts or self.cfg.trainer.replay_rollouts:  # a replay has no engines to validate with
            return {}
        metrics: dict[str, float] = {}
        with timed(metrics, "testing"):
            batch = self.generate(self.val_prompts, rollout.val_n, rollout.val_sampling, step=-1)
            scored = self.score(batch).result(metrics).summary
        sources = [p["data_source"] for p in self.val_prompts for _ in range(rollout.val_n)]
        return metrics | validation_metrics(sources, scored["score"], scored.get("acc"), rollout.val_n)

    # ---------------------------------------------------------------- checkpoints

    def save(self, step: int) -> None:
        """Every role writes into one staging folder, which becomes step_N atomically once all have succeeded.
        A failed save leaves the previous checkpoints as they were; a full disk is named as the cause."""
        try:
            self._save(step)
        except Exception as err:
            previous = self.checkpoints.latest()
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            full = disk_full(err) or out_of_space(self.checkpoints.root, previous)
            if full:
                raise RunFailed(
                    f"step {step}: the checkpoint could not be written because the disk is full ({full}); "
                    f"{kept}. Free space under {self.checkpoints.root} or point trainer.output_dir at a larger disk, "
                    f"lower trainer.keep_last, then resume with trainer.resume=auto"
                ) from err
            raise RunFailed(f"step {step}: the checkpoint could not be written ({err}); {kept}") from err

    def _save(self, step: int) -> None:
        with self.checkpoints.saving(step) as staging:
            saves = [self.roles.trainer.save_checkpoint.all(str(staging))]
            if self.roles.critic is not None:
                saves.append(self.roles.critic.save_checkpoint.all(str(staging)))
            controller = {
                "step": step,
                "train_prompts": self.train_prompts.state_dict(),
                "kl_ctrl": self.kl_ctrl.state_dict(),
                "rng": capture_rng(),
            }
            if self.ahead:  # issued for later steps: finished, kept, and trained by a resumed run; nothing is lost
                controller["rollout_ahead"] = [ahead_state(i.step, i.n, self.assemble(i)) for i in self.ahead.values()]
            save_controller_state(staging, controller)
            wait_all(saves)

    def resume(self) -> int:
        """Restore the latest (or the named) checkpoint and return the next step to run; 1 for a fresh run."""
        self.checkpoints.clean_stale()
        folder = self.checkpoints.resolve_resume(self.cfg.trainer.resume)
        if folder is None:
            return 1
        state = load_controller_state(folder)
        loads = [self.roles.trainer.load_checkpoint.all(str(folder))]
        if self.roles.critic is not None:
            loads.append(self.roles.critic.load_checkpoint.all(str(folder)))
        wait_all(loads)
        self.train_prompts.load_state_dict(state["train_prompts"])
        self.kl_ctrl.load_state_dict(state["kl_ctrl"])
        restore_rng(state["rng"])
        self.ahead = {int(saved["step"]): restore_ahead(saved) for saved in state.get("rollout_ahead", [])}
        if self.ahead:  # reported with the first step the resumed run trains
            self.startup_metrics["rollout/resumed_groups"] = float(sum(i.num_groups for i in self.ahead.values()))
        self.update_rollout_weights(version=state["step"])
        log.info("resumed from %s at step %d", folder, state["step"])
        return int(state["step"]) + 1

    # ---------------------------------------------------------------- the run

    def fit(self, total_steps: int) -> list[dict[str, float]]:
        trainer_cfg = self.cfg.trainer
        self.last_step = total_steps
        start = self.resume()
        self.rollouter_idle()  # the engines' clocks at the start: the first step's ratio is measured from here
        history: list[dict[str, float]] = []
        bar = ProgressBar(total_steps, initial_step=start - 1, enabled=trainer_cfg.progress_bar)
        try:
            # The data report (rows kept and skipped) goes with step 0, or with the first step of a resumed run.
            pending = dict(self.startup_metrics)
            if start == 1:
                if trainer_cfg.val_before_train and trainer_cfg.test_freq > 0:
                    pending |= self.validate(0)
                    bar.update(0, pending)
                if pending:
                    self.tracker.log(pending, step=0)
                pending = {}
            for step in range(start, total_steps + 1):
                metrics = pending | self.step_or_fail(step)
                pending = {}
                last = step == total_steps
                if trainer_cfg.test_freq > 0 and (step % trainer_cfg.test_freq == 0 or last):
                    metrics |= self.validate(step)
                due = trainer_cfg.save_freq != 0 and (
                    last or (trainer_cfg.save_freq > 0 and step % trainer_cfg.save_freq == 0)
                )
                if due or (self.stop.signal_name and trainer_cfg.save_freq != 0):
                    with timed(metrics, "save_checkpoint"):
                        self.save(step)
                self.tracker.log(metrics, step=step)
                bar.update(step, metrics)
                history.append(metrics)
                stuck = self.skipped_updates.check(metrics)
                if stuck:
                    raise RunFailed(f"step {step}: {stuck}. {self.resume_hint()}")
                if self.stop.signal_name and not last:
                    raise RunInterrupted(self.interrupted_message(step), self.stop.signal_name)
        finally:
            bar.close()
        return history

    def step_or_fail(self, step: int) -> dict[str, float]:
        """One step; an actor that died and could not be replaced ends the run with an error naming the step."""
        try:
            return self.step(step)
        except ActorDiedError as err:
            raise RunFailed(f"step {step}: {err}. {self.resume_hint()}") from err

    def resume_hint(self) -> str:
        latest = self.checkpoints.latest()
        if latest is None:
            return "No checkpoint was written yet."
        return f"The last checkpoint is {latest}; continue from it with trainer.resume=auto."

    def interrupted_message(self, step: int) -> str:
        saved = self.cfg.trainer.save_freq != 0
        where = f"checkpoint {self.checkpoints.latest()} written" if saved else "no checkpoint (trainer.save_freq=0)"
        return (
            f"stopped by {self.stop.signal_name} after step {step}: {where}. Continue with trainer.resume=auto "
            f"(and the same trainer.output_dir={self.run_dir})."
        )


def ahead_state(step: int, n: int, rows: StoredRows[Batch]) -> dict[str, Any]:
    """A batch generated ahead, fetched from the store as plain tensors and lists for the controller's state.pt."""
    batch = rows.fetch()
    return {
        "step": step,
        "n": n,
        "tensors": dict(batch.tensors.items()),
        "non_tensors": batch.non_tensors,
        "meta": batch.meta,
    }


def restore_ahead(state: dict[str, Any]) -> IssuedRollout:
    batch = Batch(state["tensors"], state["non_tensors"], state["meta"])
    return IssuedRollout(int(state["step"]), [], int(state["n"]), SamplingConfig(), [], StoredRows.put(batch))


def varied_groups(sequence_scores: torch.Tensor, n: int) -> torch.Tensor:
    """A row mask: True for the rows of groups whose n sequence scores are not all equal."""
    scores = sequence_scores.view(-1, n)
    return (scores.std(dim=1, unbiased=False) > 0).repeat_interleave(n)
