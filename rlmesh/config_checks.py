"""Config checks that run before any actor starts; each failure names the key, the value and the fix."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from hydra.utils import get_class

from rlmesh.algo import (
    ADVANTAGE_ESTIMATORS,
    IS_LEVELS,
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    RS_LEVELS,
    estimator_needs,
    rs_bounds,
)
from rlmesh.config import AlgorithmConfig, AsyncConfig, RlmeshConfig, check_model_path, looks_like_hub_name
from rlmesh.plan import Report, RunPlan, plan_roles, resolve_role_class


class ConfigError(ValueError):
    """One or more config values cannot work; the message lists each with its fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


def check_config(cfg: RlmeshConfig, gpus_available: int | None = None) -> RunPlan:
    """Raise ConfigError listing every problem; return the derived plan when there is none."""
    problems: list[str] = []
    roles, algo, data, trainer = cfg.roles, cfg.algorithm, cfg.data, cfg.trainer
    actor, critic, rollout = roles.trainer, roles.critic, roles.rollout

    def bad(key: str, value: object, why: str, fix: str) -> None:
        problems.append(f"{key}={value!r}: {why}. Fix: {fix}")

    # --- algorithm choices
    if algo.adv_estimator not in ADVANTAGE_ESTIMATORS:
        bad(
            "algorithm.adv_estimator",
            algo.adv_estimator,
            "unknown estimator",
            f"use one of {sorted(ADVANTAGE_ESTIMATORS)}",
        )
    if actor.policy_loss not in POLICY_LOSSES:
        bad(
            "roles.trainer.policy_loss", actor.policy_loss, "unknown policy loss", f"use one of {sorted(POLICY_LOSSES)}"
        )
    for key, mode in (
        ("roles.trainer.loss_agg_mode", actor.loss_agg_mode),
        ("roles.critic.loss_agg_mode", critic.loss_agg_mode),
    ):
        if mode not in LOSS_AGG_MODES:
            bad(key, mode, "unknown loss aggregation", f"use one of {sorted(LOSS_AGG_MODES)}")
    for key, kind in (("algorithm.kl_penalty", algo.kl_penalty), ("roles.trainer.kl_loss_type", actor.kl_loss_type)):
        if kind not in KL_ESTIMATORS:
            bad(key, kind, "unknown KL estimator", f"use one of {sorted(KL_ESTIMATORS)}")
    if algo.kl_ctrl.type not in ("fixed", "adaptive"):
        bad("algorithm.kl_ctrl.type", algo.kl_ctrl.type, "unknown KL controller", "use fixed or adaptive")

    _check_rollout_correction(bad, algo)
    _check_trainer_mode(bad, cfg)

    needs = estimator_needs(algo.adv_estimator)  # declared where the estimator is registered
    use_critic = critic.enable if critic.enable is not None else needs.values
    if needs.values and not use_critic:
        bad(
            "roles.critic.enable",
            critic.enable,
            f"adv_estimator={algo.adv_estimator} needs a critic's values",
            "set roles.critic.enable=true, or pick a critic-free estimator such as grpo",
        )
    use_kl = actor.use_kl_loss or algo.use_kl_in_reward
    use_reference = roles.reference.enable if roles.reference.enable is not None else use_kl
    if use_kl and not use_reference:
        bad(
            "roles.reference.enable",
            roles.reference.enable,
            "a KL term needs reference log-probs",
            "set roles.reference.enable=true, or turn off roles.trainer.use_kl_loss and algorithm.use_kl_in_reward",
        )
    if actor.use_kl_loss and algo.use_kl_in_reward:
        bad(
            "roles.trainer.use_kl_loss",
            True,
            "KL both as a loss and as a reward penalty counts it twice",
            "keep one: roles.trainer.use_kl_loss (GRPO style) or algorithm.use_kl_in_reward (PPO style)",
        )
    if needs.groups and rollout.n < 2:
        bad(
            "roles.rollout.n",
            rollout.n,
            f"{algo.adv_estimator} compares samples within a prompt's group",
            "set roles.rollout.n to 2 or more",
        )

    # --- sizes: global stays global; every split must be exact
    positive = {
        "data.train_batch_size": data.train_batch_size,
        "roles.rollout.n": rollout.n,
        "roles.trainer.dp_size": actor.dp_size,
        "roles.trainer.ppo_mini_batch_size": actor.ppo_mini_batch_size,
        "roles.trainer.ppo_micro_batch_size_per_device": actor.ppo_micro_batch_size_per_device,
        "roles.trainer.ppo_epochs": actor.ppo_epochs,
        "roles.rollout.num_engines": rollout.num_engines,
        "roles.reward.num_actors": roles.reward.num_actors,
        "roles.rollout.sampling.max_tokens": rollout.sampling.max_tokens,
    }
    if use_critic:
        positive |= {
            "roles.critic.dp_size": critic.dp_size,
            "roles.critic.ppo_mini_batch_size": critic.ppo_mini_batch_size,
            "roles.critic.ppo_micro_batch_size_per_device": critic.ppo_micro_batch_size_per_device,
            "roles.critic.ppo_epochs": critic.ppo_epochs,
        }
    for key, value in positive.items():
        if value < 1:
            bad(key, value, "must be at least 1", "use a positive number")
    if not problems:
        _check_split(
            bad,
            "roles.trainer",
            actor.ppo_mini_batch_size,
            actor.dp_size,
            actor.ppo_micro_batch_size_per_device,
            actor.use_dynamic_bsz,
            data.train_batch_size,
            rollout.n,
        )
        if use_critic:
            _check_split(
                bad,
                "roles.critic",
                critic.ppo_mini_batch_size,
                critic.dp_size,
                critic.ppo_micro_batch_size_per_device,
                critic.use_dynamic_bsz,
                data.train_batch_size,
                rollout.n,
            )

    # --- role settings that would otherwise fail inside an actor, after every mesh has started
    _check_role_settings(bad, cfg, use_critic)
    _check_agent(bad, cfg)
    _check_dump_and_replay(bad, cfg)

    # --- where things come from
    check_model_path(bad, "model.path", cfg.model.path)
    if actor.model.path != cfg.model.path:
        check_model_path(bad, "roles.trainer.model.path", actor.model.path)
    if use_critic and critic.model.path != cfg.model.path:
        check_model_path(bad, "roles.critic.model.path", critic.model.path)
    custom = roles.reward.custom_reward_function
    if custom.path and not Path(custom.path).is_file() and not _importable(custom.path):
        bad(
            "roles.reward.custom_reward_function.path",
            custom.path,
            "no such file or module",
            "give the path of a .py file (or an importable module) defining the function",
        )
    if data.task is None and not data.train_files:
        bad(
            "data.train_files",
            list(data.train_files),
            "no training data",
            "set data.task=arithmetic or data.train_files=[...]",
        )
    for key, files in (("data.train_files", data.train_files), ("data.val_files", data.val_files)):
        for f in files:
            if not looks_like_hub_name(f) and not Path(f).exists():
                bad(key, f, "file not found", "check the path (relative paths start at the directory you ran from)")
    if data.truncation not in ("error", "filter", "truncate_left", "truncate_right"):
        bad("data.truncation", data.truncation, "unknown policy", "use error, filter, truncate_left or truncate_right")
    if trainer.resume not in ("auto", "never") and not Path(trainer.resume).exists():
        bad(
            "trainer.resume",
            trainer.resume,
            "no such checkpoint folder",
            "use auto, never, or an existing checkpoint path",
        )

    # --- devices
    device = trainer.device if trainer.device != "auto" else ("cuda" if trainer.n_gpus > 0 else "cpu")
    if device not in ("cpu", "cuda"):
        bad("trainer.device", trainer.device, "unknown device", "use auto, cpu or cuda")
    gpus = _count_gpus() if gpus_available is None else gpus_available
    if device == "cuda" and gpus < max(trainer.n_gpus, 1):
        bad(
            "trainer.n_gpus",
            trainer.n_gpus,
            f"this machine has {gpus} GPU(s)",
            "lower trainer.n_gpus or use trainer.device=cpu",
        )
    if device == "cpu" and rollout.tensor_parallel_size > 1:
        bad(
            "roles.rollout.tensor_parallel_size",
            rollout.tensor_parallel_size,
            "tensor parallel generation needs GPUs",
            "set it to 1 on CPU",
        )

    # --- the roles: which classes, checked against their contracts, and what they ask for
    specs, weight_sync = plan_roles(bad, cfg, device, use_critic, use_reference)
    _check_colocation(bad, cfg, device, weight_sync)
    if device == "cuda":  # an actor that asks for no GPU sees none (Ray hides the others)
        for spec in specs:
            external = spec.outside_actors.get("GPU")  # vLLM's tensor-parallel workers hold the engine's GPUs
            if spec.capabilities.needs_gpu and not external and not spec.resources.get("GPU"):
                key = spec.resources_key
                bad(
                    key,
                    dict(spec.resources),
                    "this role runs on cuda but asks Ray for no GPU, so it would see none",
                    f"add one, e.g. +{key}.GPU=1 (or a fraction to share a GPU)",
                )
    # What only the class knows (vLLM's install and KV cache memory, a reward model's path), once the values it
    # reads are known to be valid: a derived complaint about an invalid config would only confuse.
    for spec in specs if not problems else ():
        preflight = getattr(spec.cls, "preflight", None)
        if callable(preflight):
            preflight(bad, cfg, device)
    if problems:
        raise ConfigError(problems)
    return RunPlan(device, use_critic, use_reference, specs, data.train_batch_size * rollout.n, weight_sync)


def _check_rollout_correction(bad: Report, algo: AlgorithmConfig) -> None:
    correction, key = algo.rollout_correction, "algorithm.rollout_correction"
    if correction.rollout_is is not None and correction.rollout_is not in IS_LEVELS:
        bad(f"{key}.rollout_is", correction.rollout_is, "unknown level", f"use one of {list(IS_LEVELS)} or null")
    if correction.rollout_rs is not None and correction.rollout_rs not in RS_LEVELS:
        bad(f"{key}.rollout_rs", correction.rollout_rs, "unknown level", f"use one of {list(RS_LEVELS)} or null")
    threshold = correction.rollout_is_threshold
    if not (math.isfinite(threshold) and threshold >= 1):
        bad(
            f"{key}.rollout_is_threshold",
            threshold,
            "the truncation cap must be a finite number >= 1 (below 1 it would shrink the weight of a sample the "
            "engine and the trainer agree on)",
            "use 2.0 (TIS's default) or another cap >= 1",
        )
    elif correction.rollout_rs is not None:
        upper = correction.rollout_rs_threshold
        if upper is not None and not (math.isfinite(upper) and upper >= 1):
            bad(f"{key}.rollout_rs_threshold", upper, "the upper bound must be a finite number >= 1", "use e.g. 2.0")
        else:
            lower, upper = rs_bounds(upper, correction.rollout_rs_threshold_lower, threshold)
            if not 0 < lower <= 1:
                bad(
                    f"{key}.rollout_rs_threshold_lower",
                    correction.rollout_rs_threshold_lower,
                    "the lower bound must be in (0, 1], or every sample the engine and trainer agree on is rejected",
                    f"use null (1 / upper = {1 / upper:g}) or a value in (0, 1]",
                )
    if correction.rollout_is is not None and not algo.recompute_old_logprobs:
        bad(
            f"{key}.rollout_is",
            correction.rollout_is,
            "in bypass mode (algorithm.recompute_old_logprobs=false) the old policy is the rollout's, so the PPO "
            "ratio already is the importance ratio pi_theta / pi_rollout and a weight on top would count it twice",
            "set algorithm.recompute_old_logprobs=true (decoupled mode), or use rollout_rs alone",
        )


TRAINER_MODES = ("sync", "one_step_off", "async")


def _check_trainer_mode(bad: Report, cfg: RlmeshConfig) -> None:
    mode, rollout, staleness = cfg.trainer.mode, cfg.roles.rollout, cfg.trainer.asynchronous.max_staleness
    if mode not in TRAINER_MODES:
        bad("trainer.mode", mode, "unknown mode", f"use one of {list(TRAINER_MODES)}")
        return
    if mode == "async" and staleness < 0:
        bad("trainer.asynchronous.max_staleness", staleness, "must be >= 0", "use 0 (synchronous), 1, 2, ...")
    if mode != "async" and staleness != AsyncConfig.max_staleness:
        bad(
            "trainer.asynchronous.max_staleness",
            staleness,
            f"only trainer.mode=async reads it, and trainer.mode={mode}",
            "set trainer.mode=async, or leave max_staleness out",
        )
    buffer = cfg.trainer.asynchronous.buffer_size
    if buffer is not None:
        batch = cfg.data.train_batch_size
        most = batch * (max(staleness, 0) + 1)
        if mode != "async":
            bad(
                "trainer.asynchronous.buffer_size",
                buffer,
                f"only trainer.mode=async reads it, and trainer.mode={mode}",
                "set trainer.mode=async, or leave buffer_size out",
            )
        elif not batch <= buffer <= most:
            bad(
                "trainer.asynchronous.buffer_size",
                buffer,
                f"must hold one step's prompts (data.train_batch_size={batch}) and can admit no more than the "
                f"staleness bound does (train_batch_size x (max_staleness + 1) = {most})",
                f"use a value from {batch} to {most}, or leave it out for {most}",
            )
    if mode == "sync":
        return
    if rollout.enable_sleep_mode:
        bad(
            "roles.rollout.enable_sleep_mode",
            True,
            f"trainer.mode={mode} generates later batches while the trainer trains, and a sleeping engine cannot "
            "generate",
            "set roles.rollout.enable_sleep_mode=false (and give the engines their own GPUs), or trainer.mode=sync",
        )
    if cfg.algorithm.dynamic_sampling.enable:
        bad(
            "algorithm.dynamic_sampling.enable",
            True,
            f"dynamic sampling decides how many prompts a step draws from their scores, and trainer.mode={mode} "
            "issues a step's prompts before the steps ahead of it are scored",
            "set trainer.mode=sync, or turn dynamic sampling off",
        )
    estimator = cfg.algorithm.adv_estimator
    if estimator in ADVANTAGE_ESTIMATORS and estimator_needs(estimator).baseline:
        bad(
            "algorithm.adv_estimator",
            cfg.algorithm.adv_estimator,
            f"its greedy baseline is generated and scored with the step's samples, which trainer.mode={mode} does "
            "not do",
            "set trainer.mode=sync, or pick an estimator without a greedy baseline (grpo, rloo, ...)",
        )


def _check_dump_and_replay(bad: Report, cfg: RlmeshConfig) -> None:
    """trainer.replay_rollouts names a dump with step files, not the folder this run dumps into; agents' episodes,
    dynamic sampling's discarded draws and greedy baselines are not in a dump, so those runs are not replayed."""
    replay, dump = cfg.trainer.replay_rollouts, cfg.trainer.dump_rollouts
    if not replay:
        return
    folder = Path(replay)
    if not folder.is_dir() or not any(folder.glob("step_*.pt")):
        bad(
            "trainer.replay_rollouts",
            replay,
            "not a folder of dumped steps (step_N.pt)",
            "point it at the trainer.dump_rollouts folder of the run to replay",
        )
    if dump and Path(dump).resolve() == folder.resolve():
        bad("trainer.dump_rollouts", dump, "is the folder being replayed", "dump the replay elsewhere, or not at all")
    if cfg.roles.agent.environment:
        bad(
            "trainer.replay_rollouts",
            replay,
            "multi-turn episodes (roles.agent) cannot be replayed: their samples come from the agent loops",
            "replay single-turn runs, or unset roles.agent.environment",
        )
    if cfg.algorithm.dynamic_sampling.enable:
        bad(
            "algorithm.dynamic_sampling.enable",
            True,
            "a replay has only the trained groups, not the draws dynamic sampling discarded",
            "replay with algorithm.dynamic_sampling.enable=false (the dump holds what was trained)",
        )
    estimator = cfg.algorithm.adv_estimator
    if estimator in ADVANTAGE_ESTIMATORS and estimator_needs(estimator).baseline:
        bad(
            "algorithm.adv_estimator",
            cfg.algorithm.adv_estimator,
            "its greedy baseline responses are not in the dump, so they cannot be replayed",
            "replay runs of estimators without a greedy baseline (not remax)",
        )


def _check_agent(bad: Report, cfg: RlmeshConfig) -> None:
    """Multi-turn settings: an environment class that can be made and whose tools have schemas, limits that an
    episode can run within, and the options that cannot take an episode's samples."""
    agent, rollout = cfg.roles.agent, cfg.roles.rollout
    if not agent.environment:
        return
    key = "roles.agent.environment"
    target = agent.environment.get("_target_")
    if not target:
        bad(key, dict(agent.environment), "no _target_", f"set {key}._target_ to an environment class's dotted path")
        return
    cls = resolve_role_class(bad, key, str(target))
    if cls is None:
        return
    # The agent loop's class says what it drives: an environment (reset, step) or a black-box agent (run).
    try:  # an unimportable agent loop is the role table's to report
        loop_cls: type | None = get_class(agent._target_)
    except Exception:
        loop_cls = None
    wanted = tuple(getattr(loop_cls, "environment_methods", ("reset", "step")))
    missing = [name for name in wanted if not callable(getattr(cls, name, None))]
    if missing:
        bad(
            f"{key}._target_",
            target,
            f"the class has no {' or '.join(missing)}, which {agent._target_} calls",
            f"give it {', '.join(wanted)} (rlmesh.envs.Environment, or rlmesh.roles.openai_agent.OpenAIAgent)",
        )
        return
    from rlmesh.envs import tool_schemas
    from rlmesh.roles.agent_loop import environment_factory

    try:  # what every agent-loop actor does first: make one (and render its tools' schemas)
        made = environment_factory(agent.environment)()
        if "step" in wanted:
            tool_schemas(made)
    except Exception as err:
        bad(key, dict(agent.environment), f"cannot be made, or its tools have no schema: {err}", "fix the class")
    if agent.max_turns < 1:
        bad("roles.agent.max_turns", agent.max_turns, "must be at least 1", "set roles.agent.max_turns >= 1")
    if agent.max_total_tokens < 2:
        bad(
            "roles.agent.max_total_tokens",
            agent.max_total_tokens,
            "must hold a prompt token and a sampled one",
            "set it to the prompt's length plus every turn's, e.g. 1024",
        )
    if agent.tool_timeout_s <= 0:
        bad("roles.agent.tool_timeout_s", agent.tool_timeout_s, "must be positive", "give a time in seconds, e.g. 10")
    if rollout.max_model_len is not None and rollout.max_model_len < agent.max_total_tokens:
        bad(
            "roles.agent.max_total_tokens",
            agent.max_total_tokens,
            f"an episode would not fit the engines' roles.rollout.max_model_len={rollout.max_model_len}",
            "lower it, or raise roles.rollout.max_model_len to at least it",
        )
    if cfg.algorithm.dynamic_sampling.enable:
        bad(
            "algorithm.dynamic_sampling.enable",
            True,
            "dynamic sampling lays draws out at the single-turn widths, which an episode's turns exceed",
            "turn dynamic sampling off with roles.agent.environment, or leave the environment out",
        )


def _check_role_settings(bad: Report, cfg: RlmeshConfig, use_critic: bool) -> None:
    """Optimizers, schedules, precision, sampling, scoring and logging: each value a role or the tracker would reject
    after the meshes have started is rejected here, with its key."""
    from rlmesh.engine.devices import DTYPES
    from rlmesh.engine.train_engine import LR_SCHEDULERS, STRATEGIES
    from rlmesh.roles.rollout.hf import SamplingError, check_sampling
    from rlmesh.tracking import BACKENDS

    roles, trainer = cfg.roles, cfg.trainer
    learners = [("roles.trainer", roles.trainer)] + ([("roles.critic", roles.critic)] if use_critic else [])
    for prefix, learner in learners:
        optim = learner.optim
        if not optim.lr > 0:
            bad(f"{prefix}.optim.lr", optim.lr, "the learning rate must be positive", "use e.g. 1e-6")
        if optim.lr_scheduler not in LR_SCHEDULERS:
            bad(f"{prefix}.optim.lr_scheduler", optim.lr_scheduler, "unknown schedule", f"use one of {LR_SCHEDULERS}")
        if optim.lr_warmup_steps < 0:
            bad(f"{prefix}.optim.lr_warmup_steps", optim.lr_warmup_steps, "must be >= 0", "use 0 for no warmup")
        if not 0.0 <= optim.min_lr_ratio <= 1.0:
            bad(f"{prefix}.optim.min_lr_ratio", optim.min_lr_ratio, "must be in [0, 1]", "use e.g. 0.1")
        if len(optim.betas) != 2:
            bad(f"{prefix}.optim.betas", list(optim.betas), "AdamW takes two betas", "use e.g. [0.9, 0.999]")
        if learner.strategy not in STRATEGIES:
            bad(f"{prefix}.strategy", learner.strategy, "unknown data-parallel strategy", f"use one of {STRATEGIES}")
        if learner.model.dtype == "float16":
            bad(
                f"{prefix}.model.dtype",
                learner.model.dtype,
                "float16 training needs loss scaling, which rlmesh does not do",
                "use bfloat16 (or auto)",
            )
    dtypes = {f"{prefix}.model.dtype": learner.model.dtype for prefix, learner in learners}
    dtypes |= {"roles.rollout.dtype": roles.rollout.dtype, "roles.reward.model.dtype": roles.reward.model.dtype}
    for key, dtype in dtypes.items():
        if dtype != "auto" and dtype not in DTYPES:
            bad(key, dtype, "unknown dtype", f"use auto or one of {sorted(DTYPES)}")
    for key, sampling in (
        ("roles.rollout.sampling", roles.rollout.sampling),
        ("roles.rollout.val_sampling", roles.rollout.val_sampling),
    ):
        try:
            check_sampling(sampling)
        except SamplingError as err:
            bad(
                f"{key}.{err.field}",
                getattr(sampling, err.field),
                f"sampling.{err.field} {err.why}",
                "pick a value in range",
            )
    reward = roles.reward
    if not reward.timeout_s > 0:
        bad("roles.reward.timeout_s", reward.timeout_s, "each sample needs a positive time limit", "use e.g. 10")
    if reward.num_workers < 0:
        bad("roles.reward.num_workers", reward.num_workers, "must be >= 0", "use 0 to score inside the reward actor")
    if not math.isfinite(reward.fallback_score):
        bad("roles.reward.fallback_score", reward.fallback_score, "must be a finite number", "use e.g. 0.0")
    overlong = reward.overlong_buffer
    if overlong.enable and not 0 < overlong.len <= roles.rollout.sampling.max_tokens:
        bad(
            "roles.reward.overlong_buffer.len",
            overlong.len,
            f"must be in (0, roles.rollout.sampling.max_tokens={roles.rollout.sampling.max_tokens}]",
            "use e.g. a quarter of max_tokens",
        )
    unknown = [name for name in trainer.logger if name not in BACKENDS]
    if unknown:
        bad("trainer.logger", list(trainer.logger), f"unknown backend(s) {unknown}", f"pick from {list(BACKENDS)}")
    if trainer.save_freq != 0 and trainer.keep_last < 1:
        bad(
            "trainer.keep_last",
            trainer.keep_last,
            "at least one checkpoint must be kept",
            "use 1 or more, or trainer.save_freq=0 to save none",
        )
    if trainer.max_consecutive_skipped_steps < 0:
        bad(
            "trainer.max_consecutive_skipped_steps",
            trainer.max_consecutive_skipped_steps,
            "must be >= 0",
            "use 0 to never stop for skipped updates",
        )
    if cfg.data.max_prompt_length < 1:
        bad("data.max_prompt_length", cfg.data.max_prompt_length, "must be at least 1", "use e.g. 512")


def _check_colocation(bad: Report, cfg: RlmeshConfig, device: str, transport: str) -> None:
    """Transports and layouts that cannot work whatever the classes: collectives on the wrong device, colocation
    that does not pair engines with trainer ranks, sleep mode off-GPU."""
    rollout, dp = cfg.roles.rollout, cfg.roles.trainer.dp_size
    colocated = rollout.colocate_with_trainer
    if transport in ("nccl", "cuda_ipc") and device != "cuda":
        bad("roles.rollout.weight_sync", rollout.weight_sync, f"{transport} needs GPUs", "use gloo (or auto) on CPU")
    if transport == "cuda_ipc" and not colocated:
        bad(
            "roles.rollout.weight_sync",
            rollout.weight_sync,
            "cuda_ipc shares GPU memory, so trainer and engines must be on the same GPU",
            "set roles.rollout.colocate_with_trainer=true, or use nccl",
        )
    if colocated and device == "cuda" and transport == "nccl":
        bad(
            "roles.rollout.weight_sync",
            rollout.weight_sync,
            "NCCL cannot connect two ranks on the same GPU, and colocated engines share the trainer's",
            "use cuda_ipc (or auto)",
        )
    if colocated and rollout.num_engines != dp:
        bad(
            "roles.rollout.num_engines",
            rollout.num_engines,
            f"colocation puts engine i on trainer rank i's bundle, and roles.trainer.dp_size={dp}",
            f"set roles.rollout.num_engines={dp}",
        )
    if colocated and rollout.tensor_parallel_size != 1:
        bad(
            "roles.rollout.tensor_parallel_size",
            rollout.tensor_parallel_size,
            "a colocated engine lives on one trainer rank's GPU",
            "set it to 1, or turn colocate_with_trainer off",
        )
    if rollout.enable_sleep_mode and device != "cuda":
        bad(
            "roles.rollout.enable_sleep_mode",
            rollout.enable_sleep_mode,
            "sleep mode frees GPU memory, and this run is on CPU",
            "set it to false",
        )


def check_cluster_resources(plan: RunPlan, cluster: dict[str, float]) -> None:
    """Fail before any actor starts if the roles together need more than the cluster has."""
    need: dict[str, float] = {}
    for role_needs in plan.resources.values():
        for key, value in role_needs.items():
            need[key] = need.get(key, 0.0) + value
    short = {k: (v, cluster.get(k, 0.0)) for k, v in need.items() if v > cluster.get(k, 0.0) + 1e-9}
    if short:
        detail = ", ".join(f"{k}: need {v:g}, cluster has {have:g}" for k, (v, have) in short.items())
        per_role = "; ".join(f"{role} {r}" for role, r in plan.resources.items())
        raise ConfigError(
            [
                f"the roles need more than the cluster has ({detail}); per role: {per_role}. Fix: lower the roles' "
                "dp_size/num_engines/num_actors or their resources_per_* (fractions are fine), or add nodes"
            ]
        )


def _check_split(bad: Report, prefix: str, mini: int, dp: int, micro: int, dynamic: bool, prompts: int, n: int) -> None:
    if prompts % mini:
        bad(
            f"{prefix}.ppo_mini_batch_size",
            mini,
            f"does not divide data.train_batch_size={prompts}",
            f"pick a divisor of {prompts}",
        )
        return
    if (prompts * n) % dp:
        bad(
            f"{prefix}.dp_size",
            dp,
            f"does not divide the {prompts * n} samples of a step (train_batch_size × n)",
            "pick a dp_size that divides train_batch_size × rollout.n",
        )
        return
    if (mini * n) % dp:
        bad(
            f"{prefix}.ppo_mini_batch_size",
            mini,
            f"× n={n} samples do not split over dp_size={dp}",
            "make ppo_mini_batch_size × rollout.n a multiple of dp_size",
        )
        return
    local = mini * n // dp
    if not dynamic and local % micro:
        bad(
            f"{prefix}.ppo_micro_batch_size_per_device",
            micro,
            f"does not divide the {local} samples each device gets per mini-batch",
            f"pick a divisor of {local}, or set {prefix}.use_dynamic_bsz=true",
        )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _count_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0
