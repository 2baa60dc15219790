"""Bad configs and bad data fail before any actor starts, with a message that names the key (and the row or file).

Every rule has a case here (the checks in rlmesh/config_checks.py, and the ones RULE_FILES hold for the role classes
and the plan); a test reads those files and fails if a rule's key has none.
The cases go through `run()`, the entry point `python -m rlmesh.train` calls, with Ray and the role meshes replaced by
tripwires: a case passes only if it fails before reaching them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import rlmesh.config_checks
import rlmesh.roles.rollout.vllm as vllm_rollout
import rlmesh.train
from rlmesh.config_checks import ConfigError
from rlmesh.data import make_task_rows
from rlmesh.roles.rollout.kv_cache import HostMemory
from rlmesh.train import DataError, run
from tests.conftest import REPO, compose_config
from tests.reliability.conftest import Report


@pytest.fixture
def no_actors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting Ray or any mesh fails the test: every case must be rejected before."""

    def tripwire(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("reached Ray or the role meshes: the bad input was not caught before any actor started")

    monkeypatch.setattr(rlmesh.train, "start_ray", tripwire)
    monkeypatch.setattr(rlmesh.train, "build_roles", tripwire)


@pytest.fixture
def tiny_folders(tmp_path: Path) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    base = REPO / "rlmesh" / "assets" / "tiny-arith"
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(base)
    model.save_pretrained(pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # an old-style pickled checkpoint
    dump = tmp_path / "dump"  # what trainer.dump_rollouts writes (the checks look for step files only)
    dump.mkdir()
    (dump / "step_000001.pt").write_bytes(b"")
    return {"no_config": no_config, "pickled": pickled, "dump": dump}


PPO = ["recipe=ppo"]
CORRECTION = "algorithm.rollout_correction"
GPU = "gpu"  # the case pretends the machine has 8 GPUs
# (id, overrides, the key the message must name, a piece of the message)
CASES: list[tuple[str, list[str], str, str]] = [
    ("estimator", ["algorithm.adv_estimator=bogus"], "algorithm.adv_estimator", "unknown estimator"),
    ("policy_loss", ["roles.trainer.policy_loss=bogus"], "roles.trainer.policy_loss", "unknown policy loss"),
    ("agg_actor", ["roles.trainer.loss_agg_mode=bogus"], "roles.trainer.loss_agg_mode", "unknown loss aggregation"),
    ("agg_critic", ["roles.critic.loss_agg_mode=bogus"], "roles.critic.loss_agg_mode", "unknown loss aggregation"),
    ("kl_penalty", ["algorithm.kl_penalty=bogus"], "algorithm.kl_penalty", "unknown KL estimator"),
    ("kl_loss_type", ["roles.trainer.kl_loss_type=bogus"], "roles.trainer.kl_loss_type", "unknown KL estimator"),
    ("kl_ctrl", ["algorithm.kl_ctrl.type=bogus"], "algorithm.kl_ctrl.type", "unknown KL controller"),
    ("critic_off", [*PPO, "roles.critic.enable=false"], "roles.critic.enable", "needs a critic"),
    (
        "reference_off",
        ["roles.trainer.use_kl_loss=true", "roles.reference.enable=false"],
        "roles.reference.enable",
        "needs reference log-probs",
    ),
    (
        "kl_twice",
        ["roles.trainer.use_kl_loss=true", "algorithm.use_kl_in_reward=true"],
        "roles.trainer.use_kl_loss",
        "counts it twice",
    ),
    ("group_of_one", ["roles.rollout.n=1"], "roles.rollout.n", "compares samples within a prompt's group"),
    ("batch_zero", ["data.train_batch_size=0"], "data.train_batch_size", "must be at least 1"),
    ("dp_zero", ["roles.trainer.dp_size=0"], "roles.trainer.dp_size", "must be at least 1"),
    ("mini_zero", ["roles.trainer.ppo_mini_batch_size=0"], "roles.trainer.ppo_mini_batch_size", "at least 1"),
    (
        "micro_zero",
        ["roles.trainer.ppo_micro_batch_size_per_device=0"],
        "roles.trainer.ppo_micro_batch_size_per_device",
        "at least 1",
    ),
    ("epochs_zero", ["roles.trainer.ppo_epochs=0"], "roles.trainer.ppo_epochs", "must be at least 1"),
    ("engines_zero", ["roles.rollout.num_engines=0"], "roles.rollout.num_engines", "must be at least 1"),
    ("reward_zero", ["roles.reward.num_actors=0"], "roles.reward.num_actors", "must be at least 1"),
    ("max_tokens_zero", ["roles.rollout.sampling.max_tokens=0"], "roles.rollout.sampling.max_tokens", "at least 1"),
    ("mini_divides", ["roles.trainer.ppo_mini_batch_size=5"], "roles.trainer.ppo_mini_batch_size", "does not divide"),
    ("dp_divides", ["roles.trainer.dp_size=3"], "roles.trainer.dp_size", "does not divide the 512 samples"),
    (
        "mini_over_dp",
        ["roles.trainer.ppo_mini_batch_size=1", "roles.trainer.dp_size=32"],
        "roles.trainer.ppo_mini_batch_size",
        "do not split over dp_size=32",
    ),
    (
        "micro_divides",
        ["roles.trainer.ppo_micro_batch_size_per_device=300"],
        "roles.trainer.ppo_micro_batch_size_per_device",
        "does not divide the 512 samples each device gets",
    ),
    ("critic_split", [*PPO, "roles.critic.ppo_mini_batch_size=5"], "roles.critic.ppo_mini_batch_size", "divide"),
    ("lr", ["roles.trainer.optim.lr=0"], "roles.trainer.optim.lr", "must be positive"),
    ("scheduler", ["roles.trainer.optim.lr_scheduler=bogus"], "roles.trainer.optim.lr_scheduler", "unknown"),
    ("warmup", ["roles.trainer.optim.lr_warmup_steps=-1"], "roles.trainer.optim.lr_warmup_steps", "must be >= 0"),
    ("min_lr", ["roles.trainer.optim.min_lr_ratio=2"], "roles.trainer.optim.min_lr_ratio", "must be in [0, 1]"),
    ("betas", ["roles.trainer.optim.betas=[0.9]"], "roles.trainer.optim.betas", "two betas"),
    ("strategy", ["roles.trainer.strategy=zero3"], "roles.trainer.strategy", "unknown data-parallel strategy"),
    ("dtype", ["model.dtype=float8"], "roles.trainer.model.dtype", "unknown dtype"),
    ("fp16", ["model.dtype=float16"], "roles.trainer.model.dtype", "needs loss scaling"),
    ("critic_lr", [*PPO, "roles.critic.optim.lr=-1"], "roles.critic.optim.lr", "must be positive"),
    ("temperature", ["roles.rollout.sampling.temperature=-1"], "roles.rollout.sampling.temperature", ">= 0"),
    ("top_p", ["roles.rollout.val_sampling.top_p=0"], "roles.rollout.val_sampling.top_p", "in (0, 1]"),
    ("top_k", ["roles.rollout.sampling.top_k=-2"], "roles.rollout.sampling.top_k", "-1 or 0"),
    ("min_tokens", ["roles.rollout.sampling.min_tokens=7"], "roles.rollout.sampling.min_tokens", "max_tokens=6]"),
    ("reward_timeout", ["roles.reward.timeout_s=0"], "roles.reward.timeout_s", "positive time limit"),
    ("reward_workers", ["roles.reward.num_workers=-1"], "roles.reward.num_workers", "must be >= 0"),
    ("fallback", ["roles.reward.fallback_score=nan"], "roles.reward.fallback_score", "finite"),
    (
        "overlong",
        ["roles.reward.overlong_buffer={enable: true, len: 100, penalty_factor: 1.0}"],
        "roles.reward.overlong_buffer.len",
        "must be in (0, roles.rollout.sampling.max_tokens=6]",
    ),
    ("logger", ["trainer.logger=[console,mlflow]"], "trainer.logger", "unknown backend(s) ['mlflow']"),
    ("keep_last", ["trainer.keep_last=0"], "trainer.keep_last", "at least one checkpoint"),
    ("skips", ["trainer.max_consecutive_skipped_steps=-1"], "trainer.max_consecutive_skipped_steps", ">= 0"),
    ("prompt_len", ["data.max_prompt_length=0"], "data.max_prompt_length", "must be at least 1"),
    ("model_empty", ["model.path=''"], "model.path", "no model given"),
    ("model_no_config", ["model.path={no_config}"], "model.path", "no config.json"),
    (
        "model_pickled",
        ["model.path={pickled}"],
        "model.path",
        "(only ['pytorch_model.bin']); rlmesh loads weights only",
    ),
    ("model_hub_offline", ["model.path=nobody/no-such-model"], "model.path", "not a local model folder"),
    (
        "trainer_model",
        ["roles.trainer.model.path={no_config}"],
        "roles.trainer.model.path",
        "no config.json",
    ),
    ("critic_model", [*PPO, "roles.critic.model.path={no_config}"], "roles.critic.model.path", "no config.json"),
    ("reward_model", ["reward=model", "roles.reward.model.path={no_config}"], "roles.reward.model.path", "config"),
    (
        "reward_file",
        ["roles.reward.custom_reward_function.path=/no/such/reward.py"],
        "roles.reward.custom_reward_function.path",
        "no such file or module",
    ),
    ("no_data", ["data.task=null"], "data.train_files", "no training data"),
    ("train_file", ["data.task=null", "data.train_files=[/no/such.parquet]"], "data.train_files", "file not found"),
    ("val_file", ["data.val_files=[/no/such.parquet]"], "data.val_files", "file not found"),
    ("truncation", ["data.truncation=bogus"], "data.truncation", "unknown policy"),
    ("resume", ["trainer.resume=/no/such/checkpoint"], "trainer.resume", "no such checkpoint folder"),
    ("device", ["trainer.device=tpu"], "trainer.device", "unknown device"),
    ("gpus", ["trainer.n_gpus=8"], "trainer.n_gpus", "this machine has 0 GPU(s)"),
    ("tp_cpu", ["roles.rollout.tensor_parallel_size=2"], "roles.rollout.tensor_parallel_size", "needs GPUs"),
    (
        "gpu_role",
        [GPU, "trainer.n_gpus=1"],
        "roles.trainer.resources_per_device",
        "+roles.trainer.resources_per_device.GPU=1",
    ),
    ("kv_node", ["roles.rollout.max_num_seqs=100000"], "roles.rollout.max_num_seqs", "NUMA node"),
    ("kv_host", ["roles.rollout.kv_cache_memory_gb=2", "small_host"], "roles.rollout.kv_cache_memory_gb", "host has"),
    ("transport", ["roles.rollout.weight_sync=carrier_pigeon"], "roles.rollout.weight_sync", "unknown transport"),
    (
        "hf_transport",
        ["rollout=hf", "roles.rollout.weight_sync=gloo"],
        "roles.rollout.weight_sync",
        "moves weights over ['object_store'] only",
    ),
    ("rollout_dtype", ["roles.rollout.dtype=half"], "roles.rollout.dtype", "unknown dtype"),
    ("critic_epochs", [*PPO, "roles.critic.ppo_epochs=0"], "roles.critic.ppo_epochs", "must be at least 1"),
    (
        "role_not_importable",
        ["roles.reward._target_=no_such_package.Scorer"],
        "roles.reward._target_",
        "cannot be imported",
    ),
    (
        "role_missing_endpoint",
        ["roles.reward._target_=rlmesh.roles.reference.Reference"],  # a real class, playing the wrong role
        "roles.reward._target_",
        "has no endpoint score(batch) (is missing), which the Scorer contract needs",
    ),
    ("nccl_cpu", ["roles.rollout.weight_sync=nccl"], "roles.rollout.weight_sync", "nccl needs GPUs"),
    (
        "ipc_apart",
        [
            GPU,
            "trainer.n_gpus=2",
            "roles.rollout.weight_sync=cuda_ipc",
            "+roles.trainer.resources_per_device.GPU=1",
            "+roles.rollout.resources_per_engine.GPU=1",
        ],
        "roles.rollout.weight_sync",
        "must be on the same GPU",
    ),
    (
        "nccl_colocated",
        [
            GPU,
            "trainer.n_gpus=1",
            "roles.rollout.weight_sync=nccl",
            "roles.rollout.colocate_with_trainer=true",
            "+roles.trainer.resources_per_device.GPU=1",
            "+roles.rollout.resources_per_engine.GPU=1",
        ],
        "roles.rollout.weight_sync",
        "NCCL cannot connect two ranks on the same GPU",
    ),
    (
        "colocated_engines",
        ["roles.rollout.colocate_with_trainer=true", "roles.rollout.num_engines=2"],
        "roles.rollout.num_engines",
        "set roles.rollout.num_engines=1",
    ),
    (
        "colocated_tp",
        [
            GPU,
            "trainer.n_gpus=2",
            "roles.rollout.colocate_with_trainer=true",
            "roles.rollout.tensor_parallel_size=2",
            "+roles.trainer.resources_per_device.GPU=1",
            "+roles.rollout.resources_per_engine.GPU=1",
        ],
        "roles.rollout.tensor_parallel_size",
        "lives on one trainer rank's GPU",
    ),
    ("sleep_cpu", ["roles.rollout.enable_sleep_mode=true"], "roles.rollout.enable_sleep_mode", "run is on CPU"),
    (
        "correction_level",
        ["algorithm.recompute_old_logprobs=true", f"{CORRECTION}.rollout_is=tokens"],
        f"{CORRECTION}.rollout_is",
        "unknown level",
    ),
    ("correction_bypass", [f"{CORRECTION}.rollout_is=token"], f"{CORRECTION}.rollout_is", "count it twice"),
    ("correction_cap", [f"{CORRECTION}.rollout_is_threshold=0.5"], f"{CORRECTION}.rollout_is_threshold", ">= 1"),
    ("rejection_level", [f"{CORRECTION}.rollout_rs=seq"], f"{CORRECTION}.rollout_rs", "unknown level"),
    (
        "rejection_upper",
        [f"{CORRECTION}.rollout_rs=token", f"{CORRECTION}.rollout_rs_threshold=0.9"],
        f"{CORRECTION}.rollout_rs_threshold",
        "upper bound must be",
    ),
    (
        "rejection_lower",
        [f"{CORRECTION}.rollout_rs=token", f"{CORRECTION}.rollout_rs_threshold_lower=1.5"],
        f"{CORRECTION}.rollout_rs_threshold_lower",
        "lower bound must be in (0, 1]",
    ),
    ("trainer_mode", ["trainer.mode=lockstep"], "trainer.mode", "unknown mode"),
    (
        "staleness_in_sync",
        ["trainer.asynchronous.max_staleness=2"],
        "trainer.asynchronous.max_staleness",
        "only trainer.mode=async reads it",
    ),
    (
        "vllm_temperature",
        ["rollout=vllm", "roles.rollout.sampling.temperature=3.0"],
        "roles.rollout.sampling.temperature",
        "vLLM samples at temperatures from 0 to 2.0",
    ),
    (
        "vllm_model_len_past_the_models_positions",
        ["rollout=vllm", "roles.rollout.max_model_len=4096"],
        "roles.rollout.max_model_len",
        "has 128 positions (max_position_embeddings), and vLLM refuses longer",
    ),
    (
        "buffer_below_a_step",
        ["trainer.mode=async", "data.train_batch_size=8", "trainer.asynchronous.buffer_size=4"],
        "trainer.asynchronous.buffer_size",
        "must hold one step's prompts (data.train_batch_size=8)",
    ),
    (
        "buffer_in_one_step_off",
        ["trainer.mode=one_step_off", "trainer.asynchronous.buffer_size=16"],
        "trainer.asynchronous.buffer_size",
        "only trainer.mode=async reads it",
    ),
    (
        "async_dynamic_sampling",
        ["trainer.mode=async", "algorithm.dynamic_sampling.enable=true"],
        "algorithm.dynamic_sampling.enable",
        "issues a step's prompts before",
    ),
    ("async_remax", ["trainer.mode=one_step_off", "recipe=remax"], "algorithm.adv_estimator", "greedy baseline"),
    (
        "agent_environment_without_target",
        ["recipe=grpo_tool", "roles.agent.environment._target_=''"],
        "roles.agent.environment",
        "no _target_",
    ),
    (
        "agent_environment_not_importable",
        ["recipe=grpo_tool", "roles.agent.environment._target_=nowhere.Environment"],
        "roles.agent.environment._target_",
        "cannot be imported",
    ),
    (
        "agent_environment_without_step",
        ["recipe=grpo_tool", "roles.agent.environment._target_=rlmesh.envs.trajectory.TokenTrajectory"],
        "roles.agent.environment._target_",
        "has no reset or step, which rlmesh.roles.agent_loop.ToolAgentLoop calls",
    ),
    (
        "agent_tool_without_schema",
        ["recipe=grpo_tool", "roles.agent.environment._target_=tests.reliability.bad_envs.UndocumentedTool"],
        "roles.agent.environment",
        "UndocumentedTool.lookup has no schema",
    ),
    ("agent_no_turns", ["recipe=grpo_tool", "roles.agent.max_turns=0"], "roles.agent.max_turns", "at least 1"),
    (
        "agent_no_tokens",
        ["recipe=grpo_tool", "roles.agent.max_total_tokens=1"],
        "roles.agent.max_total_tokens",
        "must hold a prompt token",
    ),
    (
        "agent_episode_past_the_engines",
        ["recipe=grpo_tool", "roles.agent.max_total_tokens=100"],
        "roles.agent.max_total_tokens",
        "would not fit the engines' roles.rollout.max_model_len=64",
    ),
    (
        "agent_tool_timeout",
        ["recipe=grpo_tool", "roles.agent.tool_timeout_s=0"],
        "roles.agent.tool_timeout_s",
        "must be positive",
    ),
    (
        "agent_dynamic_sampling",
        ["recipe=grpo_tool", "algorithm.dynamic_sampling.enable=true"],
        "algorithm.dynamic_sampling.enable",
        "single-turn widths",
    ),
    ("replay_no_dump", ["trainer.replay_rollouts={no_config}"], "trainer.replay_rollouts", "not a folder of dumped"),
    (
        "replay_into_itself",
        ["trainer.replay_rollouts={dump}", "trainer.dump_rollouts={dump}"],
        "trainer.dump_rollouts",
        "is the folder being replayed",
    ),
    (
        "replay_agents",
        ["recipe=grpo_tool", "trainer.replay_rollouts={dump}"],
        "trainer.replay_rollouts",
        "multi-turn episodes (roles.agent) cannot be replayed",
    ),
    (
        "replay_dynamic_sampling",
        ["trainer.replay_rollouts={dump}", "algorithm.dynamic_sampling.enable=true"],
        "algorithm.dynamic_sampling.enable",
        "not the draws dynamic sampling discarded",
    ),
    (
        "replay_greedy_baseline",
        ["recipe=remax", "trainer.replay_rollouts={dump}"],
        "algorithm.adv_estimator",
        "greedy baseline responses are not in the dump",
    ),
    ("no_vllm", ["no_vllm"], "roles.rollout._target_", "vLLM is not installed"),
    ("old_vllm", ["old_vllm"], "roles.rollout._target_", "vLLM 0.11.0 is installed, and rlmesh supports 0.32.x"),
]


def compose_case(overrides: list[str], folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Any:
    flags = {"gpu", "small_host", "no_vllm", "old_vllm"}
    if "gpu" in overrides:
        monkeypatch.setattr(rlmesh.config_checks, "_count_gpus", lambda: 8)
    if "small_host" in overrides:
        small = HostMemory(available_bytes=1 << 30, node=None, node_available_bytes=None)
        monkeypatch.setattr("rlmesh.roles.rollout.kv_cache.host_memory", lambda: small)
    if "no_vllm" in overrides:
        real = vllm_rollout.importlib.util.find_spec
        monkeypatch.setattr(
            vllm_rollout.importlib.util, "find_spec", lambda name: None if name == "vllm" else real(name)
        )
    if "old_vllm" in overrides:
        monkeypatch.setattr(vllm_rollout, "installed_vllm_version", lambda: "0.11.0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, folder in folders.items():
        overrides = [o.replace(f"{{{name}}}", str(folder)) for o in overrides]
    return compose_config(*[o for o in overrides if o not in flags])


@pytest.mark.parametrize(("overrides", "key", "why"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_bad_config_fails_before_any_actor_starts_naming_its_key(
    overrides: list[str], key: str, why: str, tiny_folders, no_actors, monkeypatch: pytest.MonkeyPatch
):
    cfg = compose_case(overrides, tiny_folders, monkeypatch)
    with pytest.raises(ConfigError) as error:
        run(cfg)
    problems = [p for p in error.value.problems if p.startswith(f"{key}=")]
    assert problems, f"no problem names {key}: {error.value.problems}"
    assert any(why in p and "Fix:" in p for p in problems), problems


RULE_FILES = ["config_checks.py", "plan.py", "config.py", "roles/rollout/vllm.py", "roles/reward.py"]


def test_every_rule_in_config_checks_has_a_case():
    """The string keys of every bad(...) call in RULE_FILES (f-string keys by their literal tail)."""
    keys = set()
    nodes = [node for name in RULE_FILES for node in ast.walk(ast.parse((REPO / "rlmesh" / name).read_text()))]
    assert any(getattr(node, "func", None) for node in nodes)
    for node in nodes:
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "bad" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant):
                keys.add(first.value)
            elif isinstance(first, ast.JoinedStr):  # f"{prefix}.dp_size": its literal tail; f"{key}.{field}": none
                tail = "".join(v.value for v in first.values if isinstance(v, ast.Constant))
                if tail.strip("."):
                    keys.add(tail)
    covered = {case[2] for case in CASES}
    missing = {key for key in keys if not any(c.endswith(key) or c == key for c in covered)}
    assert not missing, f"rules without a test case: {sorted(missing)}"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("roles.trainer.optim.lrr=1e-5", "roles.trainer.optim.lrr"),  # a typo
        ("+roles.trainer.optim.lrr=1e-5", "roles.trainer.optim.lrr (did you mean roles.trainer.optim.lr?)"),
        ("roles.trainer.optim.lr=fast", "roles.trainer.optim.lr"),  # a wrong type
        ("trainer.total_steps=many", "trainer.total_steps"),
        # the three settings that were free-form dicts, read with defaults, where typos went unnoticed
        ("algorithm.dynamic_sampling.enabel=true", "algorithm.dynamic_sampling.enabel"),
        (
            "+algorithm.dynamic_sampling.enabel=true",
            "algorithm.dynamic_sampling.enabel (did you mean algorithm.dynamic_sampling.enable?)",
        ),
        ("+roles.reward.overlong_buffer.lenght=4", "(did you mean roles.reward.overlong_buffer.len?)"),
        ("roles.reward.custom_reward_function.nmae=f", "roles.reward.custom_reward_function.nmae"),
        ("+roles.reward.custom_reward_function.nmae=f", "(did you mean roles.reward.custom_reward_function.name?)"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(override: str, named: str, no_actors):
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import OmegaConfBaseException

    with pytest.raises((ConfigCompositionException, OmegaConfBaseException, ConfigError)) as error:
        run(compose_config(override))
    text = f"{error.value} {error.value.__cause__}"
    assert named in text, text


def test_impossible_resources_fail_before_any_mesh_starts(monkeypatch: pytest.MonkeyPatch, ray_cluster):
    def tripwire(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a role mesh started although the cluster could not hold the roles")

    monkeypatch.setattr(rlmesh.train, "build_roles", tripwire)
    # The default recipe's trainer (2 CPUs), 40 engines of 1 CPU and the reward actor (0.5).
    with pytest.raises(ConfigError, match=r"CPU: need 42.5, cluster has 16.*per role: trainer \{'CPU': 2.0\}"):
        run(compose_config("roles.rollout.num_engines=40", "trainer.progress_bar=false"))


def test_the_command_line_prints_the_problem_and_exits_1_without_a_traceback(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "rlmesh.train", "roles.trainer.ppo_mini_batch_size=5", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "roles.trainer.ppo_mini_batch_size=5: does not divide data.train_batch_size=32" in output
    assert "Traceback" not in output


# ---------------------------------------------------------------------------------------------- bad data


def write_rows(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def data_config(train: Path, *overrides: str) -> Any:
    sizes = [
        "data.train_batch_size=8",
        "roles.trainer.ppo_mini_batch_size=8",
        "roles.trainer.ppo_micro_batch_size_per_device=8",
    ]
    return compose_config("data.task=null", f"data.train_files=[{train}]", *sizes, *overrides)


GOOD = make_task_rows("arithmetic", 16, 5, "train", digits=2, operators="+")
BROKEN = {"data_source": "arithmetic", "prompt": 12, "reward_model": {"ground_truth": "1"}}


@pytest.mark.parametrize(
    ("rows", "overrides", "expected"),
    [
        ([*GOOD, BROKEN], ["data.strict=true"], r"data.train_files=.*row 16 .* is malformed: prompt must be a list"),
        (
            [*GOOD, {**GOOD[0], "prompt": [{"role": "user", "content": "1+" * 20 + "1="}]}],
            [],
            r"row 16 .* has a prompt of 42 tokens, longer than max_prompt_length=16.*data.max_prompt_length",
        ),
        (GOOD[:5], [], r"data.train_batch_size=8: batch_size=8 is larger than the dataset \(5 rows\)"),
        ([BROKEN, BROKEN], [], r"has no usable rows: 2 rows, 2 malformed"),
    ],
    ids=["strict_malformed_row", "prompt_over_the_limit", "smaller_than_one_batch", "no_usable_row"],
)
def test_bad_data_fails_before_any_actor_starts_naming_the_key_and_row(
    rows: list[Any], overrides: list[str], expected: str, tmp_path: Path, no_actors
):
    with pytest.raises(DataError, match=expected):
        run(data_config(write_rows(tmp_path / "train.jsonl", rows), *overrides))


def test_a_corrupted_parquet_file_is_named(tmp_path: Path, no_actors, report: Report):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD), path)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # cut short, like an interrupted copy
    with pytest.raises(DataError, match=r"data.train_files=.*train.parquet' is not a readable parquet file"):
        run(data_config(path))
    report(
        "8b",
        "corrupted parquet, strict malformed row, prompt over the limit, dataset smaller than a batch",
        "clear error naming the key (and row or file) before any actor starts",
    )
    report(
        "9",
        f"{len(CASES)} invalid values (every rule), typos, wrong types, impossible resources",
        "ConfigError naming key, value and fix before any actor starts; CLI exits 1 without a traceback",
    )
