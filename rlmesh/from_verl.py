"""`rlmesh from-verl`: a verl command line (or ppo_trainer.yaml override list) translated into an rlmesh one, with
every key that has no rlmesh counterpart reported and why; the key table is the migration guide's."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

AR = "actor_rollout_ref"


@dataclass(frozen=True)
class KeyMap:
    """One verl key: the rlmesh keys it sets (the value converted by `convert`), or why it has none (`reason`)."""

    verl: str
    rlmesh: tuple[str, ...] = ()
    convert: Callable[[str], str] | None = None
    reason: str = ""  # for keys without an rlmesh counterpart: why, and what to do instead
    note: str = ""  # for mapped keys whose meaning differs in a way a user should know


def _bool(value: str) -> bool:
    return value.strip().strip("'\"").lower() in ("true", "1", "yes")


def _as_list(value: str) -> str:
    """verl takes one path or a list of them; rlmesh's data files are lists."""
    value = value.strip()
    return value if value.startswith("[") else f"[{value}]"


def _not(value: str) -> str:
    return str(not _bool(value)).lower()


def _truncation_of_filter(value: str) -> str:
    # verl drops overlong prompts when loading; rlmesh's truncation=filter does that (and counts them)
    return "filter" if _bool(value) else "error"


def _strategy(value: str) -> str:
    return {"fsdp": "fsdp2", "fsdp2": "fsdp2", "ddp": "ddp"}.get(value.strip("'\""), value)


def _scheduler(value: str) -> str:
    return {"constant": "constant", "cosine": "cosine", "linear": "linear"}.get(value.strip("'\""), value)


def _resume(value: str) -> str:
    return {"auto": "auto", "disable": "never", "resume_path": "auto"}.get(value.strip("'\""), value)


def _truncation(value: str) -> str:
    # verl's left / right are rlmesh's truncate_left / truncate_right
    value = value.strip("'\"")
    return {"left": "truncate_left", "right": "truncate_right"}.get(value, value)


OFFLOAD = "rlmesh's FSDP2 roles keep parameters and optimizer state on the device (no CPU offload); drop it"
MICRO = "rlmesh scores log-probs in the role's own micro-batches (roles.trainer.ppo_micro_batch_size_per_device)"

KEYS: tuple[KeyMap, ...] = (
    # algorithm
    KeyMap("algorithm.adv_estimator", ("algorithm.adv_estimator",)),
    KeyMap("algorithm.gamma", ("algorithm.gamma",)),
    KeyMap("algorithm.lam", ("algorithm.lam",)),
    KeyMap("algorithm.norm_adv_by_std_in_grpo", ("algorithm.norm_adv_by_std_in_grpo",)),
    KeyMap("algorithm.use_kl_in_reward", ("algorithm.use_kl_in_reward",)),
    KeyMap("algorithm.kl_penalty", ("algorithm.kl_penalty",)),
    KeyMap("algorithm.kl_ctrl.type", ("algorithm.kl_ctrl.type",)),
    KeyMap("algorithm.kl_ctrl.kl_coef", ("algorithm.kl_ctrl.kl_coef",)),
    KeyMap("algorithm.kl_ctrl.target_kl", ("algorithm.kl_ctrl.target_kl",)),
    KeyMap("algorithm.kl_ctrl.horizon", ("algorithm.kl_ctrl.horizon",)),
    KeyMap("algorithm.filter_groups.enable", ("algorithm.dynamic_sampling.enable",)),
    KeyMap("algorithm.filter_groups.max_num_gen_batches", ("algorithm.dynamic_sampling.max_num_gen_batches",)),
    KeyMap(
        "algorithm.filter_groups.metric",
        reason="rlmesh keeps groups whose sequence scores vary (verl's metric=seq_final_reward); other metrics: no",
    ),
    KeyMap("algorithm.rollout_correction.rollout_is", ("algorithm.rollout_correction.rollout_is",)),
    KeyMap("algorithm.rollout_correction.rollout_is_threshold", ("algorithm.rollout_correction.rollout_is_threshold",)),
    KeyMap("algorithm.rollout_correction.rollout_rs", ("algorithm.rollout_correction.rollout_rs",)),
    KeyMap("algorithm.rollout_correction.rollout_rs_threshold", ("algorithm.rollout_correction.rollout_rs_threshold",)),
    KeyMap(
        "algorithm.rollout_correction.rollout_rs_threshold_lower",
        ("algorithm.rollout_correction.rollout_rs_threshold_lower",),
    ),
    KeyMap(
        "algorithm.rollout_correction.bypass_mode",
        ("algorithm.recompute_old_logprobs",),
        _not,
        note="bypass mode is rlmesh's recompute_old_logprobs=false",
    ),
    # data
    KeyMap("data.train_files", ("data.train_files",), _as_list),
    KeyMap("data.val_files", ("data.val_files",), _as_list),
    KeyMap("data.train_batch_size", ("data.train_batch_size",)),
    KeyMap("data.val_batch_size", ("data.val_batch_size",)),
    KeyMap("data.max_prompt_length", ("data.max_prompt_length",)),
    KeyMap(
        "data.max_response_length",
        ("roles.rollout.sampling.max_tokens", "roles.rollout.val_sampling.max_tokens"),
        note="also sets roles.rollout.max_model_len to max_prompt_length + max_response_length when both are given",
    ),
    KeyMap("data.truncation", ("data.truncation",), _truncation),
    KeyMap("data.filter_overlong_prompts", ("data.truncation",), _truncation_of_filter),
    KeyMap("data.shuffle", ("data.shuffle",)),
    KeyMap(
        "data.prompt_key",
        reason="rlmesh reads verl's own columns (prompt, data_source, reward_model.ground_truth, extra_info); "
        "rename the column in the parquet",
    ),
    KeyMap("data.return_raw_chat", reason="not needed: agent loops get the chat messages of every row"),
    # the policy model
    KeyMap(f"{AR}.model.path", ("model.path",)),
    KeyMap(f"{AR}.model.enable_gradient_checkpointing", ("model.gradient_checkpointing",)),
    KeyMap(f"{AR}.model.use_remove_padding", ("model.use_remove_padding",)),
    KeyMap(f"{AR}.model.trust_remote_code", ("model.trust_remote_code",)),
    KeyMap(f"{AR}.hybrid_engine", ("roles.rollout.colocate_with_trainer",)),
    # the actor (rlmesh's trainer role)
    KeyMap(f"{AR}.actor.strategy", ("roles.trainer.strategy",), _strategy),
    KeyMap(f"{AR}.actor.optim.lr", ("roles.trainer.optim.lr",)),
    KeyMap(f"{AR}.actor.optim.weight_decay", ("roles.trainer.optim.weight_decay",)),
    KeyMap(f"{AR}.actor.optim.betas", ("roles.trainer.optim.betas",)),
    KeyMap(f"{AR}.actor.optim.lr_warmup_steps", ("roles.trainer.optim.lr_warmup_steps",)),
    KeyMap(
        f"{AR}.actor.optim.lr_warmup_steps_ratio",
        reason="rlmesh takes warm-up in steps: set roles.trainer.optim.lr_warmup_steps to ratio x total steps",
    ),
    KeyMap(f"{AR}.actor.optim.warmup_style", ("roles.trainer.optim.lr_scheduler",), _scheduler),
    KeyMap(f"{AR}.actor.optim.lr_scheduler_type", ("roles.trainer.optim.lr_scheduler",), _scheduler),
    KeyMap(f"{AR}.actor.optim.min_lr_ratio", ("roles.trainer.optim.min_lr_ratio",)),
    KeyMap(f"{AR}.actor.grad_clip", ("roles.trainer.optim.grad_clip",)),
    KeyMap(f"{AR}.actor.ppo_mini_batch_size", ("roles.trainer.ppo_mini_batch_size",)),
    KeyMap(f"{AR}.actor.ppo_micro_batch_size_per_gpu", ("roles.trainer.ppo_micro_batch_size_per_device",)),
    KeyMap(
        f"{AR}.actor.ppo_micro_batch_size",
        reason="verl's deprecated global micro-batch; set roles.trainer.ppo_micro_batch_size_per_device "
        "(ppo_micro_batch_size / number of GPUs)",
    ),
    KeyMap(f"{AR}.actor.use_dynamic_bsz", ("roles.trainer.use_dynamic_bsz",)),
    KeyMap(f"{AR}.actor.ppo_max_token_len_per_gpu", ("roles.trainer.ppo_max_token_len_per_device",)),
    KeyMap(f"{AR}.actor.ppo_epochs", ("roles.trainer.ppo_epochs",)),
    KeyMap(f"{AR}.actor.shuffle", ("roles.trainer.shuffle",)),
    KeyMap(f"{AR}.actor.clip_ratio", ("roles.trainer.clip_ratio",)),
    KeyMap(f"{AR}.actor.clip_ratio_low", ("roles.trainer.clip_ratio_low",)),
    KeyMap(f"{AR}.actor.clip_ratio_high", ("roles.trainer.clip_ratio_high",)),
    KeyMap(f"{AR}.actor.clip_ratio_c", ("roles.trainer.clip_ratio_c",)),
    KeyMap(f"{AR}.actor.loss_agg_mode", ("roles.trainer.loss_agg_mode",)),
    KeyMap(f"{AR}.actor.policy_loss.loss_mode", ("roles.trainer.policy_loss",)),
    KeyMap(f"{AR}.actor.entropy_coeff", ("roles.trainer.entropy_coeff",)),
    KeyMap(f"{AR}.actor.use_kl_loss", ("roles.trainer.use_kl_loss",)),
    KeyMap(f"{AR}.actor.kl_loss_coef", ("roles.trainer.kl_loss_coef",)),
    KeyMap(f"{AR}.actor.kl_loss_type", ("roles.trainer.kl_loss_type",)),
    KeyMap(f"{AR}.actor.fsdp_config.param_offload", reason=OFFLOAD),
    KeyMap(f"{AR}.actor.fsdp_config.optimizer_offload", reason=OFFLOAD),
    KeyMap(f"{AR}.actor.fsdp_config.grad_offload", reason=OFFLOAD),
    # the rollout
    KeyMap(f"{AR}.rollout.name", ("rollout",), note="a config group: rollout=vllm or rollout=hf"),
    KeyMap(f"{AR}.rollout.mode", reason="rlmesh's vLLM engines are always asynchronous (AsyncLLM); drop it"),
    KeyMap(f"{AR}.rollout.n", ("roles.rollout.n",)),
    KeyMap(f"{AR}.rollout.temperature", ("roles.rollout.sampling.temperature",)),
    KeyMap(f"{AR}.rollout.top_p", ("roles.rollout.sampling.top_p",)),
    KeyMap(f"{AR}.rollout.top_k", ("roles.rollout.sampling.top_k",)),
    KeyMap(f"{AR}.rollout.response_length", ("roles.rollout.sampling.max_tokens",)),
    KeyMap(f"{AR}.rollout.val_kwargs.temperature", ("roles.rollout.val_sampling.temperature",)),
    KeyMap(f"{AR}.rollout.val_kwargs.top_p", ("roles.rollout.val_sampling.top_p",)),
    KeyMap(f"{AR}.rollout.val_kwargs.top_k", ("roles.rollout.val_sampling.top_k",)),
    KeyMap(f"{AR}.rollout.val_kwargs.n", ("roles.rollout.val_n",)),
    KeyMap(
        f"{AR}.rollout.val_kwargs.do_sample",
        ("roles.rollout.val_sampling.temperature",),
        note="False is greedy (temperature 0); True samples at val_kwargs.temperature",
    ),
    KeyMap(f"{AR}.rollout.tensor_model_parallel_size", ("roles.rollout.tensor_parallel_size",)),
    KeyMap(f"{AR}.rollout.gpu_memory_utilization", ("roles.rollout.gpu_memory_utilization",)),
    KeyMap(f"{AR}.rollout.max_num_seqs", ("roles.rollout.max_num_seqs",)),
    KeyMap(f"{AR}.rollout.max_model_len", ("roles.rollout.max_model_len",)),
    KeyMap(f"{AR}.rollout.enforce_eager", ("roles.rollout.enforce_eager",)),
    KeyMap(f"{AR}.rollout.enable_prefix_caching", ("roles.rollout.enable_prefix_caching",)),
    KeyMap(f"{AR}.rollout.free_cache_engine", ("roles.rollout.enable_sleep_mode",)),
    KeyMap(f"{AR}.rollout.dtype", ("roles.rollout.dtype",)),
    KeyMap(f"{AR}.rollout.log_prob_micro_batch_size_per_gpu", reason=MICRO),
    KeyMap(f"{AR}.rollout.log_prob_micro_batch_size", reason=MICRO),
    KeyMap(
        f"{AR}.rollout.max_num_batched_tokens",
        reason="rlmesh lets vLLM size its step budget (whole prefills on CPU); set it with a rollout subclass",
    ),
    KeyMap(f"{AR}.rollout.enable_chunked_prefill", reason="rlmesh lets vLLM decide on GPU, and turns it off on CPU"),
    KeyMap(f"{AR}.rollout.multi_turn.enable", reason="multi-turn is on when roles.agent.environment is set"),
    KeyMap(f"{AR}.rollout.multi_turn.max_assistant_turns", ("roles.agent.max_turns",)),
    KeyMap(
        f"{AR}.rollout.multi_turn.tool_config_path",
        reason="rlmesh's tools are an environment class's methods: roles.agent.environment._target_=my_pkg.MyEnv",
    ),
    # the reference
    KeyMap(f"{AR}.ref.log_prob_micro_batch_size_per_gpu", ("roles.reference.log_prob_micro_batch_size_per_device",)),
    KeyMap(
        f"{AR}.ref.log_prob_micro_batch_size",
        reason="verl's deprecated global micro-batch; set roles.reference.log_prob_micro_batch_size_per_device",
    ),
    KeyMap(f"{AR}.ref.fsdp_config.param_offload", reason=OFFLOAD),
    # the critic
    KeyMap("critic.strategy", ("roles.critic.strategy",), _strategy),
    KeyMap("critic.optim.lr", ("roles.critic.optim.lr",)),
    KeyMap("critic.optim.weight_decay", ("roles.critic.optim.weight_decay",)),
    KeyMap("critic.optim.lr_warmup_steps", ("roles.critic.optim.lr_warmup_steps",)),
    KeyMap("critic.grad_clip", ("roles.critic.optim.grad_clip",)),
    KeyMap("critic.model.path", ("roles.critic.model.path",)),
    KeyMap("critic.model.enable_gradient_checkpointing", ("roles.critic.model.gradient_checkpointing",)),
    KeyMap("critic.model.use_remove_padding", ("roles.critic.model.use_remove_padding",)),
    KeyMap("critic.model.trust_remote_code", ("roles.critic.model.trust_remote_code",)),
    KeyMap("critic.ppo_mini_batch_size", ("roles.critic.ppo_mini_batch_size",)),
    KeyMap("critic.ppo_micro_batch_size_per_gpu", ("roles.critic.ppo_micro_batch_size_per_device",)),
    KeyMap("critic.use_dynamic_bsz", ("roles.critic.use_dynamic_bsz",)),
    KeyMap("critic.ppo_max_token_len_per_gpu", ("roles.critic.ppo_max_token_len_per_device",)),
    KeyMap("critic.ppo_epochs", ("roles.critic.ppo_epochs",)),
    KeyMap("critic.cliprange_value", ("roles.critic.cliprange_value",)),
    KeyMap("critic.loss_agg_mode", ("roles.critic.loss_agg_mode",)),
    KeyMap("critic.model.fsdp_config.param_offload", reason=OFFLOAD),
    KeyMap("critic.model.fsdp_config.optimizer_offload", reason=OFFLOAD),
    # rewards
    KeyMap("custom_reward_function.path", ("roles.reward.custom_reward_function.path",)),
    KeyMap("custom_reward_function.name", ("roles.reward.custom_reward_function.name",)),
    KeyMap("reward_model.enable", ("reward",), lambda v: "model" if _bool(v) else "rule", note="a config group"),
    KeyMap("reward_model.model.path", ("roles.reward.model.path",)),
    KeyMap("reward_model.micro_batch_size_per_gpu", ("roles.reward.micro_batch_size_per_device",)),
    KeyMap(
        "reward_model.reward_manager",
        reason="rlmesh has one rule reward role (verl's naive and dapo managers; dapo's overlong penalty is "
        "roles.reward.overlong_buffer); prime's: no",
    ),
    KeyMap("reward_model.overlong_buffer.enable", ("roles.reward.overlong_buffer.enable",)),
    KeyMap("reward_model.overlong_buffer.len", ("roles.reward.overlong_buffer.len",)),
    KeyMap("reward_model.overlong_buffer.penalty_factor", ("roles.reward.overlong_buffer.penalty_factor",)),
    # the trainer (rlmesh's run settings)
    KeyMap("trainer.total_epochs", ("trainer.total_epochs",)),
    KeyMap("trainer.total_training_steps", ("trainer.total_steps",)),
    KeyMap("trainer.project_name", ("trainer.project_name",)),
    KeyMap("trainer.experiment_name", ("trainer.experiment_name",)),
    KeyMap("trainer.logger", ("trainer.logger",)),
    KeyMap("trainer.save_freq", ("trainer.save_freq",)),
    KeyMap("trainer.test_freq", ("trainer.test_freq",)),
    KeyMap("trainer.val_before_train", ("trainer.val_before_train",)),
    KeyMap("trainer.resume_mode", ("trainer.resume",), _resume),
    KeyMap("trainer.resume_from_path", ("trainer.resume",)),
    KeyMap("trainer.default_local_dir", ("trainer.output_dir",)),
    KeyMap("trainer.max_actor_ckpt_to_keep", ("trainer.keep_last",)),
    KeyMap("trainer.device", ("trainer.device",)),
    KeyMap("trainer.seed", ("trainer.seed",)),
    KeyMap(
        "trainer.n_gpus_per_node",
        ("trainer.n_gpus",),
        note="trainer.n_gpus is the total: n_gpus_per_node x nnodes",
    ),
    KeyMap(
        "trainer.nnodes",
        reason="rlmesh places roles on whatever cluster cluster.address joins (ray start on each node); it counts "
        "GPUs in trainer.n_gpus",
    ),
    KeyMap("trainer.critic_warmup", reason="rlmesh has no critic warm-up; 0 (verl's examples) is its behaviour"),
    KeyMap("trainer.use_legacy_worker_impl", reason="verl's worker implementation switch; no effect here"),
    KeyMap("trainer.log_val_generations", reason="rlmesh eval writes every validation sample to generations.jsonl"),
    KeyMap("ray_init.num_cpus", ("cluster.num_cpus",)),
)
BY_KEY = {entry.verl: entry for entry in KEYS}
# Values verl's examples set that need nothing in rlmesh: "the same" is not worth a warning.
NO_OP_VALUES = {"trainer.critic_warmup": {"0"}, "trainer.nnodes": {"1"}, f"{AR}.rollout.mode": {"async", "sync"}}
ROLLOUTS = ("vllm", "hf")  # the rollout config group's options
VERL_ENTRY = re.compile(r"(^|/)verl[./]trainer[./]main_ppo(\.py)?$")


@dataclass
class Translation:
    """The rlmesh overrides for a verl command line, and the verl keys left out, each with its reason."""

    overrides: list[str] = field(default_factory=list)
    unmapped: list[tuple[str, str]] = field(default_factory=list)  # (verl key=value, why)
    notes: list[str] = field(default_factory=list)

    def command(self) -> str:
        return " ".join(["python -m rlmesh.train", *(_shell_quote(o) for o in self.overrides)])


def verl_overrides(command: str | Sequence[str]) -> list[str]:
    """The key=value overrides of a verl command line (a shell string with line continuations, or its words), or
    of a ppo_trainer.yaml override list: whatever comes before `verl.trainer.main_ppo`, and shell words that are
    not overrides ($@, set -x), are dropped."""
    words = shlex.split(command.replace("\\\n", " "), comments=True) if isinstance(command, str) else list(command)
    starts = [i for i, word in enumerate(words) if VERL_ENTRY.search(word)]
    if starts:
        words = words[starts[-1] + 1 :]
    return [word for word in words if "=" in word and not word.startswith("-")]


def translate(command: str | Sequence[str]) -> Translation:
    """rlmesh overrides for the verl command: the recipe (ppo_gsm8k for GAE, grpo_gsm8k otherwise, both verl's
    GSM8K examples), then each mapped key in order. Keys the command leaves out come from that recipe."""
    pairs = []
    for word in verl_overrides(command):
        key, value = word.split("=", 1)
        pairs.append((key.lstrip("+~"), value))
    given = dict(pairs)
    result = Translation()
    estimator = given.get("algorithm.adv_estimator", "gae").strip("'\"")  # verl's default estimator is GAE
    result.overrides.append(f"recipe={'ppo_gsm8k' if estimator == 'gae' else 'grpo_gsm8k'}")
    if "algorithm.adv_estimator" not in given:
        result.notes.append("no algorithm.adv_estimator: verl's default, gae (PPO with a critic)")
    gpus = _gpu_count(given)
    for key, value in pairs:
        entry = BY_KEY.get(key)
        if entry is None:
            result.unmapped.append((f"{key}={value}", "not a key rlmesh maps; see docs/from-verl.md"))
            continue
        if not entry.rlmesh:
            if value.strip("'\"") not in NO_OP_VALUES.get(key, set()):
                result.unmapped.append((f"{key}={value}", entry.reason))
            continue
        if key == f"{AR}.rollout.name" and value.strip("'\"") not in ROLLOUTS:
            result.unmapped.append((f"{key}={value}", f"rlmesh's rollouts are {', '.join(ROLLOUTS)}"))
            continue
        if key == "data.truncation" and _bool(given.get("data.filter_overlong_prompts", "false")):
            continue  # verl filters overlong prompts first, so its truncation never applies: filter wins
        if key == f"{AR}.rollout.val_kwargs.do_sample":
            if not _bool(value):  # greedy; sampling keeps val_kwargs.temperature (rlmesh's default is greedy)
                result.overrides.append("roles.rollout.val_sampling.temperature=0.0")
            elif f"{AR}.rollout.val_kwargs.temperature" not in given:
                result.overrides.append("roles.rollout.val_sampling.temperature=1.0")  # verl's default temperature
            result.notes.append(f"{key}: {entry.note}")
            continue
        converted = entry.convert(value) if entry.convert else value
        if key == "trainer.n_gpus_per_node" and gpus is not None:
            converted = str(gpus)
        for target in entry.rlmesh:
            result.overrides.append(f"{target}={converted}")
        if entry.note:
            result.notes.append(f"{key}: {entry.note}")
    prompt, response = given.get("data.max_prompt_length", ""), given.get("data.max_response_length", "")
    if prompt.isdigit() and response.isdigit() and f"{AR}.rollout.max_model_len" not in given:
        result.overrides.append(f"roles.rollout.max_model_len={int(prompt) + int(response)}")
    elif response and f"{AR}.rollout.max_model_len" not in given:  # shell variables: the user's to fill in
        result.notes.append("set roles.rollout.max_model_len to data.max_prompt_length + data.max_response_length")
    if given.get("trainer.nnodes", "1").strip("'\"") != "1":
        result.notes.append("several nodes: start Ray on each (ray start) and pass cluster.address=HEAD_IP:6379")
    return result


def _gpu_count(given: dict[str, str]) -> int | None:
    try:
        per_node = int(given["trainer.n_gpus_per_node"])
    except (KeyError, ValueError):
        return None
    try:
        return per_node * int(given.get("trainer.nnodes", "1"))
    except ValueError:
        return per_node


def _shell_quote(word: str) -> str:
    """Quote for a POSIX shell, keeping $VARS expandable (verl's examples use $HOME)."""
    if re.fullmatch(r"[\w@%+=:,./-]+", word):
        return word
    if "$" in word:
        escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
        return f'"{escaped}"'
    return shlex.quote(word)


def key_table() -> str:
    """The migration guide's table: each verl key, its rlmesh key(s), and the note or the reason it has none."""
    lines = ["| verl | rlmesh | notes |", "|---|---|---|"]
    for entry in KEYS:
        target = ", ".join(f"`{key}`" for key in entry.rlmesh) if entry.rlmesh else "-"
        lines.append(f"| `{entry.verl}` | {target} | {entry.note or entry.reason} |")
    return "\n".join(lines)
