"""The typed config schema: every key a recipe may set, its type and default. Hydra validates overrides against it.

Names follow verl's where one exists. Global sizes are global (over all devices); per-device sizes end in
`_per_device`. Nothing here is ever mutated after validation: derived sizes are computed where they are used.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

Report = Callable[[str, object, str, str], None]  # bad(key, value, why, fix): how a config check reports a problem


@dataclass
class ModelConfig:
    path: str = MISSING  # a local Hugging Face folder, or a hub name (needs network at run time)
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU; or float32 | bfloat16 | float16
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    # verl's name: forwards of the trainer, reference and critic run on the real tokens only, several sequences per
    # row (rlmesh.engine.forward.packed_forward); the same log-probs, values and gradients for less work when
    # lengths vary
    use_remove_padding: bool = False


def follow_policy_model() -> ModelConfig:
    """A role's model that follows the top-level `model` unless a recipe or override sets it."""
    return ModelConfig(
        path="${model.path}",
        dtype="${model.dtype}",
        gradient_checkpointing="${model.gradient_checkpointing}",  # type: ignore[arg-type]
        trust_remote_code="${model.trust_remote_code}",  # type: ignore[arg-type]
        attn_implementation="${model.attn_implementation}",
        use_remove_padding="${model.use_remove_padding}",  # type: ignore[arg-type]
    )


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    lr_warmup_steps: int = 0  # optimizer steps of linear warmup
    lr_scheduler: str = "constant"  # constant | cosine | linear (decay after warmup)
    min_lr_ratio: float = 0.0  # cosine/linear decay floor, as a fraction of lr
    total_training_steps: int = -1  # -1: filled from trainer.total_steps × optimizer steps per step, never stored


@dataclass
class ActorConfig:
    """The policy trainer (verl: actor_rollout_ref.actor)."""

    _target_: str = "rlmesh.roles.trainer.PolicyTrainer"
    model: ModelConfig = field(default_factory=follow_policy_model)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: str = "ddp"  # ddp | fsdp2
    dp_size: int = 1  # data-parallel actors (devices on GPU)
    ppo_mini_batch_size: int = 32  # prompts per optimizer step, global (× rollout.n samples)
    ppo_micro_batch_size_per_device: int = 8  # samples per forward/backward on one device
    use_dynamic_bsz: bool = False  # micro-batches by token budget instead of sample count
    ppo_max_token_len_per_device: int = 16384
    ppo_epochs: int = 1
    shuffle: bool = False
    policy_loss: str = "vanilla"  # vanilla (PPO clip) | gspo | any registered name
    clip_ratio: float = 0.2
    clip_ratio_low: float | None = None
    clip_ratio_high: float | None = None
    clip_ratio_c: float | None = 3.0  # dual-clip bound for negative advantages; null disables
    loss_agg_mode: str = "token-mean"
    loss_norm_constant: float | None = None  # for seq-mean-token-sum-norm (Dr.GRPO); null = max response length
    entropy_coeff: float = 0.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    resources_per_device: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})


@dataclass
class CriticConfig:
    _target_: str = "rlmesh.roles.critic.Critic"
    enable: bool | None = None  # None: on when the advantage estimator needs values (gae)
    model: ModelConfig = field(default_factory=follow_policy_model)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    strategy: str = "ddp"
    dp_size: int = 1
    ppo_mini_batch_size: int = 32
    ppo_micro_batch_size_per_device: int = 8
    use_dynamic_bsz: bool = False
    ppo_max_token_len_per_device: int = 16384
    ppo_epochs: int = 1
    cliprange_value: float = 0.5
    loss_agg_mode: str = "token-mean"
    resources_per_device: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})


@dataclass
class ReferenceConfig:
    _target_: str = "rlmesh.roles.reference.Reference"
    enable: bool | None = None  # None: on when a KL term is used (use_kl_loss or use_kl_in_reward)
    dp_size: int = 1
    log_prob_micro_batch_size_per_device: int = 16
    resources_per_device: dict[str, float] = field(default_factory=lambda: {"CPU": 0.5})


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 512  # response length cap
    # vLLM's min_tokens: stop tokens (eos, stop_token_ids) are masked out until a response has this many tokens;
    # = max_tokens makes every response run to the cap (a generation-bound benchmark on an untrained model)
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # None: derived from trainer.seed, the step and the prompt, so runs reproduce


@dataclass
class RolloutConfig:
    _target_: str = "rlmesh.roles.rollout.vllm.VLLMRollout"
    n: int = 8  # samples per prompt
    num_engines: int = 1  # rollout actors (each one engine)
    tensor_parallel_size: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    val_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    val_n: int = 1
    gpu_memory_utilization: float = 0.3  # GPU: the fraction of device memory vLLM takes; unused on CPU (see below)
    max_model_len: int | None = None
    max_num_seqs: int = 256
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    # KV cache per engine. None: on CPU, room for max_num_seqs × max_model_len tokens (+25%), never a fraction of host
    # memory (NUMA nodes report a fraction of it); on GPU, gpu_memory_utilization decides.
    kv_cache_memory_gb: float | None = None
    # Engine i shares trainer rank i's placement bundle (and, on GPU, its device): weights then sync over CUDA IPC.
    colocate_with_trainer: bool = False
    enable_sleep_mode: bool = False  # GPU: a colocated engine sleeps (frees its KV cache) while the trainer trains
    dtype: str = "auto"
    generation_batch_size: int = 64  # HF backend: sequences per generate() call
    max_concurrent_requests_per_engine: int | None = None  # mesh in-flight cap (pull-style dispatch)
    weight_sync: str = "auto"  # auto | object_store | gloo | nccl | cuda_ipc
    sync_bucket_mb: int = 256
    sync_timeout_s: float = 120.0
    # A sync that lands while requests are generating (trainer.mode=async) pauses the engine with them kept. By
    # default their KV cache is recomputed under the new weights when they resume, and the prefix cache is emptied.
    # true keeps the KV computed by older weights, theirs and the prefix cache's while any request runs (vLLM
    # resets it only when no block is in use): faster, and no longer exactly the new policy's continuation.
    reuse_kv_across_syncs: bool = False
    resources_per_engine: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})


@dataclass
class CustomRewardFunctionConfig:
    """verl's custom_reward_function: a compute_score defined in a file or module."""

    path: str | None = None  # a .py file or an importable module; None: the built-in scorer for each data_source
    name: str = "compute_score"


@dataclass
class OverlongBufferConfig:
    """DAPO's soft overlong penalty: responses longer than max_tokens - len lose up to penalty_factor, linearly."""

    enable: bool = False
    len: int = 0
    penalty_factor: float = 1.0


@dataclass
class RewardConfig:
    _target_: str = "rlmesh.roles.reward.RuleReward"
    num_actors: int = 1
    custom_reward_function: CustomRewardFunctionConfig = field(default_factory=CustomRewardFunctionConfig)
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 2  # scoring processes per reward actor
    timeout_s: float = 10.0  # per sample; a sample over it gets fallback_score
    fallback_score: float = 0.0
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path=""))  # the reward model, for reward=model
    micro_batch_size_per_device: int = 16
    resources_per_actor: dict[str, float] = field(default_factory=lambda: {"CPU": 0.5})


@dataclass
class AgentConfig:
    """Multi-turn rollouts: with an environment set, every sample is an episode that agent-loop actors play, one
    rollout.generate call per model turn (routed to the episode's engine), the environment's tools run there.
    sampling.max_tokens caps each turn; data.max_prompt_length the first prompt."""

    _target_: str = "rlmesh.roles.agent_loop.ToolAgentLoop"
    # The environment class, one instance per episode: {_target_: package.module.Class, ...its kwargs}.
    # Empty: single-turn generation (no agent loop).
    environment: dict[str, Any] = field(default_factory=dict)
    num_actors: int = 1
    max_turns: int = 4  # model turns per episode
    max_total_tokens: int = 1024  # prompt and every turn of one training sample
    tool_timeout_s: float = 10.0  # each tool call, and each environment reset or step
    resources_per_actor: dict[str, float] = field(default_factory=lambda: {"CPU": 0.25})


@dataclass
class RolesConfig:
    trainer: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)


@dataclass
class KLControlConfig:
    type: str = "fixed"  # fixed | adaptive
    kl_coef: float = 0.001
    target_kl: float = 0.1
    horizon: int = 10000


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling: draw prompts again until every kept group has reward variance."""

    enable: bool = False
    max_num_gen_batches: int = 10  # draws per step at most; then flat groups top the step up


@dataclass
class RolloutCorrectionConfig:
    """Corrects for training on samples the rollout engine drew (verl's algorithm.rollout_correction keys and
    rollout_corr/ metrics; rlmesh.algo.rollout_correction has the formulas). The mismatch metrics are logged with
    everything off. Decoupled mode (recompute_old_logprobs=true) weights and rejects by pi_old / pi_rollout before
    the update; bypass mode (false, verl's bypass_mode) rejects by pi_theta / pi_rollout in the loss, where the PPO
    ratio already is the importance ratio, so it takes no rollout_is. Rejected tokens leave the loss's normaliser in
    decoupled mode (and the critic's loss too); in bypass mode, decided micro-batch by micro-batch, they keep their
    place in it with weight 0."""

    rollout_is: str | None = None  # token | sequence: importance weights on the policy loss, truncated (TIS)
    rollout_is_threshold: float = 2.0  # the truncation cap C
    rollout_rs: str | None = None  # token (IcePop) | sequence (MIS) | geometric: reject outside [lower, upper]
    rollout_rs_threshold: float | None = None  # upper; None = rollout_is_threshold
    rollout_rs_threshold_lower: float | None = None  # None = 1 / upper


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "grpo"  # gae | grpo | rloo | reinforce_plus_plus | reinforce_plus_plus_baseline | remax | opo
    gamma: float = 1.0
    lam: float = 1.0
    norm_adv_by_std_in_grpo: bool = True  # false = Dr.GRPO
    # false: the rollout's own log-probs serve as the behaviour policy's (no extra forward pass). Safe when the
    # engine computes like the trainer (fp32 vLLM on CPU: probabilities within 1.4e-6, training/rollout_probs_diff_max
    # with true); with bf16 engines keep recomputing.
    recompute_old_logprobs: bool = True
    use_kl_in_reward: bool = False
    kl_penalty: str = "kl"  # k1/kl | k2/mse | k3/low_var_kl | abs
    kl_ctrl: KLControlConfig = field(default_factory=KLControlConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)


@dataclass
class DataConfig:
    task: str | None = None  # a synthetic task generated on the fly (arithmetic | countdown | digit_sort)
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    train_size: int = 8192  # synthetic rows
    val_size: int = 256
    train_files: list[str] = field(default_factory=list)  # parquet / jsonl / datasets folders / hub names
    val_files: list[str] = field(default_factory=list)
    train_batch_size: int = 32  # prompts per step, global
    val_batch_size: int | None = None  # None: the whole validation set at once
    max_prompt_length: int = 512
    truncation: str = "error"  # error | filter | truncate_left | truncate_right
    apply_chat_template: bool = True
    shuffle: bool = True
    strict: bool = False  # malformed rows raise instead of being reported and skipped


@dataclass
class ClusterConfig:
    address: str | None = None  # None: start a local Ray on 127.0.0.1; "auto" joins a running cluster
    num_cpus: float | None = None  # local Ray: None = enough for the roles
    num_gpus: int | None = None
    placement_timeout_s: float = 120.0


@dataclass
class AsyncConfig:
    """trainer.mode=async (the key is not `async`, a Python keyword). A step's batch is issued max_staleness steps
    before the step that trains it, on the engines' weights of that moment, so admission, not discarding, bounds
    every trained sample's staleness by max_staleness versions, and at most train_batch_size x (max_staleness + 1)
    prompts are in flight or finished and waiting. 0 is the synchronous run, bit for bit."""

    max_staleness: int = 1
    # The most prompts issued and not yet trained (in flight, or finished and waiting), the running step's
    # included: between data.train_batch_size and train_batch_size x (max_staleness + 1), the default. Below that a
    # step ahead is issued in parts, as trained steps free room, which bounds the engines' load and the memory the
    # finished groups hold, not the staleness.
    buffer_size: int | None = None


@dataclass
class TrainerConfig:
    project_name: str = "rlmesh"
    experiment_name: str = "run"
    # sync: generate, then train, on the same weights. one_step_off: the next step's batch is generated while this
    # step trains, by the weights before this step's update, and finished before the sync: one version old at most.
    # async: generation runs asynchronous.max_staleness steps ahead, and syncs land on requests in flight.
    mode: str = "sync"
    asynchronous: AsyncConfig = field(default_factory=lambda: AsyncConfig())
    total_steps: int | None = None  # None: total_epochs × steps per epoch
    total_epochs: int = 1
    test_freq: int = 10  # validate every N steps (and before training); -1 = never
    val_before_train: bool = True
    save_freq: int = -1  # checkpoint every N steps (and at the end); -1 = only at the end; 0 = never
    keep_last: int = 2  # checkpoints kept
    resume: str = "auto"  # auto | never | <checkpoint path>
    output_dir: str = "outputs/${trainer.project_name}/${trainer.experiment_name}"
    device: str = "auto"  # auto = cuda when n_gpus > 0, else cpu
    n_gpus: int = 0  # GPUs the run may use in total (roles place their actors on them)
    seed: int = 1
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])  # + wandb
    progress_bar: bool = True
    # Stop after this many steps in a row whose every update was skipped for a non-finite loss or gradient; 0 = never.
    max_consecutive_skipped_steps: int = 3
    plot: bool = True  # a PNG of reward and validation accuracy per step at the end
    # Each step's spans (the controller's phases, every role's endpoint calls, tool calls) as a Chrome / Perfetto
    # trace: <output_dir>/traces/step_N.json (chrome://tracing or ui.perfetto.dev).
    trace: bool = True
    # A folder: each step's samples (tokens, rollout and trainer log-probs, rewards, advantages, weight versions) as
    # step_N.pt, and step_N.html to read them (decoded text, mask, reward, rollout-vs-trainer log-prob gap).
    dump_rollouts: str | None = None
    # A dump_rollouts folder: train on its samples instead of generating (no engines; each request is answered by
    # the dumped samples of its seed), so a step can be replayed and debugged. Validation is skipped.
    replay_rollouts: str | None = None


@dataclass
class EvalConfig:
    """`rlmesh eval`: a checkpoint or Hugging Face model folder on the validation data (data.val_files, or the task's
    test split), scored by the reward role, generated by the rollout role's engines. The samples per prompt and
    their sampling are the in-loop validation's: roles.rollout.val_n and roles.rollout.val_sampling."""

    # A run folder (its latest checkpoint), a checkpoint (step_N), or a Hugging Face model folder; None: model.path.
    checkpoint: str | None = None
    # A checkpoint of an rlmesh run is evaluated with that run's config (its config.yaml: data, reward, rollout), the
    # command line's key=value overrides on top; false: the config composed from the command line alone.
    use_run_config: bool = True
    output_dir: str | None = None  # generations.jsonl and summary.json; None: <the model folder's run>/eval or ./eval
    bootstrap_samples: int = 1000  # resamples of the prompts for each metric's confidence interval; 0 = none
    confidence: float = 0.95


@dataclass
class RlmeshConfig:
    recipe: str = "grpo"
    model: ModelConfig = field(default_factory=ModelConfig)  # the policy; roles interpolate ${model} by default
    roles: RolesConfig = field(default_factory=RolesConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def unknown_keys(config: Mapping[str, Any], schema: type = RlmeshConfig, prefix: str = "") -> list[str]:
    """Keys of `config` (a composed DictConfig) that `schema` has no field for, each with the closest known name.

    Hydra lets `+key=value` add a key even to a typed node, where it would then be silently ignored; a typo such as
    `+roles.trainer.optim.lrr=1e-5` must fail instead. Free-form dict fields (task_kwargs, resources, ...) are not
    walked.
    """
    fields = [f.name for f in dataclasses.fields(schema)]
    hints = typing.get_type_hints(schema)
    problems = []
    for key in config:
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            problems.append(f"{name}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            continue
        kind, value = hints[str(key)], config[key]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind) and hasattr(value, "keys"):
            problems += unknown_keys(value, kind, f"{name}.")
    return problems


def check_model_path(bad: Report, key: str, path: str) -> None:
    """A model folder must hold config.json and safetensors weights; a hub name must be cached or downloadable."""
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
    if looks_like_hub_name(path):
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


def looks_like_hub_name(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/")) and not Path(path).exists()
