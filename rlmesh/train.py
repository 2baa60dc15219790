"""Hydra entry point: compose the recipe, validate it, start Ray, build the role meshes and run the loop.

python -m rlmesh.train recipe=grpo [dotted.overrides ...]
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import hydra
import ray
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rlmesh.config import RlmeshConfig, unknown_keys
from rlmesh.config_checks import ConfigError, check_cluster_resources, check_config
from rlmesh.loop import RLLoop, Roles
from rlmesh.mesh import ActorMesh, Placement, PlacementError, start_store_worker
from rlmesh.mesh.collective import BIND_HOST_ENV
from rlmesh.plan import NO_WEIGHTS, RoleSpec, RunPlan
from rlmesh.recovery import RunFailed, RunInterrupted, StopRequest
from rlmesh.run_summary import end_lines, startup_lines

if TYPE_CHECKING:
    from rlmesh.roles.contracts import (
        AgentLoopMesh,
        PolicyMesh,
        ReferenceMesh,
        RolloutMesh,
        ScorerMesh,
        ValueMesh,
    )

log = logging.getLogger("rlmesh")

ASSETS = Path(__file__).resolve().parent / "assets"
# Absolute: Hydra resolves a relative config_path against the calling module, which the `rlmesh` console script
# makes a package path (and configs/ is no package).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
OmegaConf.register_new_resolver("rlmesh_asset", lambda name: str(ASSETS / name), replace=True)
ConfigStore.instance().store(name="rlmesh_schema", node=RlmeshConfig)


# Exit codes of a run stopped by a signal, as shells report them (128 + the signal's number).
SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except RunInterrupted as stopped:
        log.error("%s", stopped)
        sys.exit(SIGNAL_EXIT_CODES.get(stopped.signal_name, 1))
    except (RunFailed, ConfigError, DataError) as failed:
        log.error("%s", failed)  # the message says what failed and what to do; a traceback would bury it
        sys.exit(1)


def run(cfg: DictConfig) -> list[dict[str, float]]:
    """Validate everything, then train. Returns the per-step metrics."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(
            [f"{key}: not a key rlmesh knows. Fix: check its spelling in rlmesh/config.py" for key in unknown]
        )
    cfg = with_absolute_dump_paths(cfg)
    typed: RlmeshConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]  # schema type errors name the key
    plan = check_config(typed)
    run_dir = Path(typed.trainer.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(typed.model.path, trust_remote_code=typed.model.trust_remote_code)
    train_prompts, val_prompts, data_report = build_prompts(typed, tokenizer)
    total_steps = typed.trainer.total_steps or typed.trainer.total_epochs * len(train_prompts)

    started = time.perf_counter()
    print_startup(typed, plan, run_dir, data_report, total_steps)
    release = contextlib.ExitStack()  # Ray (if we start it), placements and meshes, released last-made first
    if start_ray(typed, plan):
        release.callback(ray.shutdown)
    stop = release.enter_context(stop_on_signals())  # after ray.init, which installs a SIGTERM handler of its own
    try:
        check_cluster_resources(plan, ray.cluster_resources())
        start_store_worker(["rlmesh.batch_stages"])  # the loop's whole-batch stages run there; it starts meanwhile
        roles = build_roles(typed, plan, total_steps, release)
        roles.weight_sync.setup()
        from rlmesh.tracking import Tracker, plot_curves

        container = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
        with Tracker(
            run_dir, list(typed.trainer.logger), typed.trainer.project_name, typed.trainer.experiment_name, container
        ) as tracker:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            loop = RLLoop(typed, roles, train_prompts, val_prompts, pad, run_dir, tracker, stop, data_report)
            history = loop.fit(total_steps)
        png = None
        if typed.trainer.plot and "jsonl" in typed.trainer.logger:
            png = plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
            log.info("learning curves: %s", png)
        try:
            for line in end_lines(run_dir, history, png, time.perf_counter() - started):
                log.info("%s", line)
        except Exception as err:  # a summary that cannot be made must not fail a finished run
            log.warning("no end-of-run summary: %s", err)
        return history
    finally:
        release.close()  # every callback runs, even after one fails


def with_absolute_dump_paths(cfg: DictConfig) -> DictConfig:
    """trainer.dump_rollouts and replay_rollouts resolved here, since the store worker and the replay actors read
    them from their own directories; a replay has no engines, so nothing to colocate or put to sleep."""
    trainer = cfg.trainer
    if not (trainer.get("dump_rollouts") or trainer.get("replay_rollouts")):
        return cfg
    cfg = cfg.copy()
    for key in ("dump_rollouts", "replay_rollouts"):
        if cfg.trainer[key]:
            cfg.trainer[key] = str(Path(cfg.trainer[key]).resolve())
    if cfg.trainer.replay_rollouts:
        cfg.roles.rollout.colocate_with_trainer = False
        cfg.roles.rollout.enable_sleep_mode = False
    return cfg


def print_startup(
    cfg: RlmeshConfig, plan: RunPlan, run_dir: Path, data_report: dict[str, float], total_steps: int
) -> None:
    """The start-up summary on the console: the run's settings, then the resolved roles as a table."""
    from rich.console import Console
    from rich.table import Table

    lines, rows = startup_lines(cfg, plan, run_dir, data_report, total_steps)
    for line in lines:
        log.info("%s", line)
    table = Table(title="roles")
    for column in ("role", "class", "shape", "resources per actor", "contracts"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(stderr=True, width=160).print(table)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While training, the first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step, with a
    checkpoint; a second one interrupts at once (actors are still shut down on the way out). Off the main thread,
    where Python cannot take signals, nothing is installed."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop.signal_name is not None:
            raise KeyboardInterrupt(f"second {name}: stopping now, without a checkpoint")
        stop.signal_name = name
        log.warning("%s: stopping after this step, with a checkpoint (send it again to stop now)", name)

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class DataError(ValueError):
    """The training or validation data cannot be used; the message names the config key and the bad row or file."""


def build_prompts(cfg: RlmeshConfig, tokenizer: Any) -> tuple[Any, list[Any], dict[str, float]]:
    """The training loader, the validation prompts, and counts of the rows skipped (data/<split>/malformed_rows,
    data/<split>/filtered_rows), from a synthetic task or verl-format files. Unusable data raises DataError naming
    the key to change."""
    from rlmesh.data import PromptDataset, PromptLoader, make_task_rows

    data = cfg.data
    options: dict[str, Any] = dict(
        max_prompt_length=data.max_prompt_length,
        overlong=data.truncation,
        apply_chat_template=data.apply_chat_template,
        strict=data.strict,
    )
    keys = "data.max_prompt_length, data.truncation (error | filter | truncate_left | truncate_right), data.strict"
    val: PromptDataset | None
    if data.task is not None:
        rows = make_task_rows(data.task, data.train_size, cfg.trainer.seed, "train", **data.task_kwargs)
        train = PromptDataset.from_rows(rows, tokenizer, name=f"{data.task}/train", **options)
        val_rows = make_task_rows(data.task, data.val_size, cfg.trainer.seed, "test", **data.task_kwargs)
        val = PromptDataset.from_rows(val_rows, tokenizer, name=f"{data.task}/test", **options)
    else:
        try:
            train = PromptDataset(list(data.train_files), tokenizer, **options)
        except (ValueError, OSError, KeyError) as err:
            raise DataError(f"data.train_files={list(data.train_files)}: {err}. Related keys: {keys}") from err
        try:
            val = PromptDataset(list(data.val_files), tokenizer, split="test", **options) if data.val_files else None
        except (ValueError, OSError, KeyError) as err:
            raise DataError(f"data.val_files={list(data.val_files)}: {err}. Related keys: {keys}") from err
    try:
        loader = PromptLoader(train, data.train_batch_size, shuffle=data.shuffle, seed=cfg.trainer.seed)
    except ValueError as err:
        raise DataError(
            f"data.train_batch_size={data.train_batch_size}: {err}. Lower data.train_batch_size (and "
            "roles.trainer.ppo_mini_batch_size with it), or add rows"
        ) from err
    report: dict[str, float] = {}
    for split, dataset in (("train", train), ("val", val)):
        if dataset is not None:
            report[f"data/{split}/rows"] = float(len(dataset))
            report[f"data/{split}/malformed_rows"] = float(dataset.num_malformed)
            report[f"data/{split}/filtered_rows"] = float(dataset.num_filtered)
    return loader, [val[i] for i in range(len(val))] if val is not None else [], report


def start_ray(cfg: RlmeshConfig, plan: RunPlan) -> bool:
    """Join cluster.address, or start a local Ray on 127.0.0.1 sized for the roles. True if we started it."""
    if ray.is_initialized():
        return False
    cluster = cfg.cluster
    if cluster.address:
        ray.init(address=cluster.address, log_to_driver=True)
        return True
    cpus = math.ceil(cluster.num_cpus or sum(r.get("CPU", 0.0) for r in plan.resources.values()) + 1)
    gpus = cluster.num_gpus if cluster.num_gpus is not None else (cfg.trainer.n_gpus if plan.device == "cuda" else 0)
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    # Ray 2.60 replaces a loopback node address with the machine's reachable one and binds its own servers to all
    # interfaces, so its token authentication is what guards them: Ray turns it on for a new local cluster unless
    # RAY_AUTH_MODE says otherwise. rlmesh's own stores and collective groups listen on loopback.
    ray.init(
        num_cpus=cpus,
        num_gpus=gpus,
        include_dashboard=False,
        log_to_driver=True,
        # PYTHONPATH: user role classes in the working directory import in the workers.
        runtime_env={"env_vars": {"PYTHONPATH": path, BIND_HOST_ENV: "127.0.0.1"}},
    )
    return True


def build_roles(cfg: RlmeshConfig, plan: RunPlan, total_steps: int, release: contextlib.ExitStack) -> Roles:
    """One mesh per row of the plan's role table, each registered with `release` for shutdown, and the weight sync
    from the trainer to the engines."""
    restart_hooks: list[Any] = []
    built = start_meshes(cfg, plan, total_steps, release, restart_hooks)
    weight_sync = make_weight_sync(cfg, plan.weight_sync, built["trainer"], built["rollout"])
    restart_hooks.append(weight_sync.on_rollout_restart)
    # The plan checked every class against its role's contract, so each mesh is typed by it.
    return Roles(
        trainer=cast("PolicyMesh", built["trainer"]),
        rollout=cast("RolloutMesh", built["rollout"]),
        reward=cast("ScorerMesh", built["reward"]),
        reference=cast("ReferenceMesh", built["reference"]) if "reference" in built else None,
        critic=cast("ValueMesh", built["critic"]) if "critic" in built else None,
        weight_sync=weight_sync,
        agent=cast("AgentLoopMesh", built["agent"]) if "agent" in built else None,
    )


def start_meshes(
    cfg: RlmeshConfig,
    plan: RunPlan,
    total_steps: int,
    release: contextlib.ExitStack,
    restart_hooks: list[Any],
    only: set[str] | None = None,
) -> dict[str, ActorMesh[Any]]:
    """The meshes of the plan's roles (those named in `only`, else all), started wave by wave (a wave's meshes
    concurrently), each registered with `release` for shutdown. `restart_hooks` run when rollout engines are
    replaced."""
    specs = [spec for spec in plan.roles if only is None or spec.name in only]
    cluster_timeout = cfg.cluster.placement_timeout_s

    def on_rollout_restart(mesh: ActorMesh[Any], positions: list[int]) -> None:
        for hook in restart_hooks:  # the weight sync, once built, brings new engines up to date first
            hook(mesh, positions)

    # Reserve every role's bundles one role after another, largest GPU share first: made concurrently, small
    # fractional bundles (a reference's 0.1 GPU) could land where a larger one (a critic's 0.2) was still to go.
    placements: dict[str, Placement] = {}
    for spec in sorted(specs, key=lambda s: -float((s.bundle or s.resources).get("GPU", 0.0))):
        if spec.colocate_with is None:
            try:
                placements[spec.name] = Placement.create(
                    spec.size, spec.bundle or spec.resources, timeout_s=cluster_timeout
                )
            except PlacementError as err:
                raise PlacementError(f"role '{spec.name}': {err}") from err
            release.callback(placements[spec.name].remove)

    def start(spec: RoleSpec) -> ActorMesh[Any]:
        kwargs = dict(spec.kwargs)
        if spec.learner:  # the learning-rate schedule spans the whole run
            kwargs["total_training_steps"] = total_steps * spec.optimizer_steps_per_step
        if spec.name == "agent":  # the agent loops call the engines themselves (the mesh arrives attached)
            kwargs["rollout"] = built["rollout"]
        options = dict(spec.mesh_options)
        if spec.mesh_options.get("auto_restart"):
            options["on_restart"] = on_rollout_restart
        return ActorMesh(
            spec.cls,
            spec.shape,
            kwargs=kwargs,
            name=spec.name,
            resources=spec.resources,
            placement=placements[spec.colocate_with or spec.name],
            placement_timeout_s=cluster_timeout,
            **options,
        )

    built: dict[str, ActorMesh[Any]] = {}
    with ThreadPoolExecutor(len(specs)) as pool:
        for wave in sorted({spec.wave for spec in specs}):
            futures = {spec.name: pool.submit(start, spec) for spec in specs if spec.wave == wave}
            errors = []
            for name, future in futures.items():
                try:
                    built[name] = future.result()
                    release.callback(built[name].shutdown)
                except Exception as err:
                    errors.append(f"{name}: {err}")
            if errors:
                raise RuntimeError("role meshes failed to start:\n" + "\n".join(errors))
    return built


def make_weight_sync(cfg: RlmeshConfig, transport: str, trainer: ActorMesh[Any], rollout: ActorMesh[Any]) -> Any:
    """The weight sync over `transport` (what check_config resolved roles.rollout.weight_sync to)."""
    from rlmesh.sync import NoWeightSync, ObjectStoreWeightSync

    if transport == NO_WEIGHTS:
        return NoWeightSync()
    if transport == "object_store":
        return ObjectStoreWeightSync(trainer, rollout, timeout_s=cfg.roles.rollout.sync_timeout_s)
    from rlmesh.sync.collective_sync import CollectiveWeightSync

    return CollectiveWeightSync(
        trainer,
        rollout,
        transport=transport,
        colocated=cfg.roles.rollout.colocate_with_trainer,
        bucket_mb=cfg.roles.rollout.sync_bucket_mb,
        timeout_s=cfg.roles.rollout.sync_timeout_s,
    )


if __name__ == "__main__":
    main()
