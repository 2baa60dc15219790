"""rlmesh from-verl on command lines shaped like verl's published GSM8K GRPO and PPO examples: the translation
composes into a valid rlmesh config with the same settings, and every key it cannot map is reported with a reason."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import rlmesh.train  # noqa: F401  # registers the config schema and the asset resolver with Hydra
from rlmesh.cli import main
from rlmesh.config import RlmeshConfig, unknown_keys
from rlmesh.from_verl import KEYS, key_table, translate, verl_overrides
from tests.conftest import REPO, compose_config

# verl's examples/grpo_trainer/run_qwen2-7b.sh (GSM8K, function reward), as published
VERL_GRPO = r"""set -x

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    data.train_files=$HOME/data/gsm8k/train.parquet \
    data.val_files=$HOME/data/gsm8k/test.parquet \
    data.train_batch_size=1024 \
    data.max_prompt_length=512 \
    data.max_response_length=1024 \
    data.filter_overlong_prompts=True \
    data.truncation='error' \
    actor_rollout_ref.model.path=Qwen/Qwen2-7B-Instruct \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.actor.ppo_mini_batch_size=256 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=40 \
    actor_rollout_ref.actor.use_kl_loss=True \
    actor_rollout_ref.actor.kl_loss_coef=0.001 \
    actor_rollout_ref.actor.kl_loss_type=low_var_kl \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.fsdp_config.param_offload=False \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=40 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.n=5 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=40 \
    actor_rollout_ref.ref.fsdp_config.param_offload=True \
    algorithm.use_kl_in_reward=False \
    trainer.critic_warmup=0 \
    trainer.logger='["console","wandb"]' \
    trainer.project_name='verl_grpo_example_gsm8k' \
    trainer.experiment_name='qwen2_7b_function_rm' \
    trainer.n_gpus_per_node=8 \
    trainer.nnodes=1 \
    trainer.save_freq=20 \
    trainer.test_freq=5 \
    trainer.total_epochs=15 $@
"""

# verl's examples/ppo_trainer/run_deepseek7b_llm.sh (GSM8K PPO with a critic), as published
VERL_PPO = r"""python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=gae \
    data.train_files=$HOME/data/gsm8k/train.parquet \
    data.val_files=$HOME/data/gsm8k/test.parquet \
    data.train_batch_size=1024 \
    data.max_prompt_length=512 \
    data.max_response_length=512 \
    data.filter_overlong_prompts=True \
    data.truncation='error' \
    actor_rollout_ref.model.path=deepseek-ai/deepseek-llm-7b-chat \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.actor.ppo_mini_batch_size=256 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.actor.fsdp_config.param_offload=False \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=4 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
    critic.optim.lr=1e-5 \
    critic.model.use_remove_padding=False \
    critic.model.path=deepseek-ai/deepseek-llm-7b-chat \
    critic.model.enable_gradient_checkpointing=True \
    critic.ppo_micro_batch_size_per_gpu=32 \
    critic.model.fsdp_config.param_offload=False \
    critic.model.fsdp_config.optimizer_offload=False \
    algorithm.use_kl_in_reward=False \
    trainer.critic_warmup=0 \
    trainer.logger=['console'] \
    trainer.project_name='verl_example_gsm8k' \
    trainer.experiment_name='deepseek_llm_7b_function_rm' \
    trainer.n_gpus_per_node=8 \
    trainer.nnodes=2 \
    trainer.total_training_steps=2 \
    trainer.use_legacy_worker_impl=False \
    trainer.total_epochs=15 $@
"""


def composed(overrides: list[str]) -> RlmeshConfig:
    """The translation as the shell would hand it to rlmesh (quotes removed, $HOME expanded), composed and typed."""
    words = shlex.split(" ".join(overrides))
    cfg = compose_config(*(word.replace("$HOME", "/home/user") for word in words))
    assert unknown_keys(cfg) == []
    typed: RlmeshConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]  # the schema checks every type
    return typed


def test_the_grpo_example_translates_into_the_same_run():
    result = translate(VERL_GRPO)
    cfg = composed(result.command().split()[3:])
    assert cfg.recipe == "grpo_gsm8k" and cfg.algorithm.adv_estimator == "grpo"
    assert cfg.data.train_files == ["/home/user/data/gsm8k/train.parquet"]
    assert cfg.data.train_batch_size == 1024 and cfg.data.max_prompt_length == 512
    assert cfg.data.truncation == "filter"  # verl drops overlong prompts first: its truncation='error' never applies
    assert cfg.roles.rollout.sampling.max_tokens == 1024 == cfg.roles.rollout.val_sampling.max_tokens
    assert cfg.roles.rollout.max_model_len == 1536
    assert cfg.model.path == "Qwen/Qwen2-7B-Instruct" and cfg.model.use_remove_padding
    assert cfg.model.gradient_checkpointing
    trainer = cfg.roles.trainer
    assert (trainer.optim.lr, trainer.ppo_mini_batch_size, trainer.ppo_micro_batch_size_per_device) == (1e-6, 256, 40)
    assert trainer.use_kl_loss and trainer.kl_loss_coef == 0.001 and trainer.kl_loss_type == "low_var_kl"
    assert trainer.entropy_coeff == 0
    assert cfg.roles.rollout.tensor_parallel_size == 2 and cfg.roles.rollout.n == 5
    assert cfg.roles.rollout.gpu_memory_utilization == 0.6
    assert cfg.roles.reference.log_prob_micro_batch_size_per_device == 40
    assert cfg.trainer.logger == ["console", "wandb"] and cfg.trainer.n_gpus == 8
    assert (cfg.trainer.save_freq, cfg.trainer.test_freq, cfg.trainer.total_epochs) == (20, 5, 15)
    assert cfg.trainer.project_name == "verl_grpo_example_gsm8k"
    unmapped = dict(result.unmapped)
    assert set(unmapped) == {
        "actor_rollout_ref.actor.fsdp_config.param_offload=False",
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload=False",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=40",
        "actor_rollout_ref.ref.fsdp_config.param_offload=True",
    }
    assert all("offload" in why for key, why in unmapped.items() if "offload" in key)
    assert "critic_warmup" not in " ".join(unmapped)  # 0 is rlmesh's behaviour: nothing to report


def test_the_ppo_example_translates_with_a_critic_and_reports_what_it_cannot_map():
    result = translate(VERL_PPO)
    cfg = composed(result.command().split()[3:])
    assert cfg.recipe == "ppo_gsm8k" and cfg.algorithm.adv_estimator == "gae"
    assert cfg.roles.critic.optim.lr == 1e-5 and cfg.roles.critic.model.path == "deepseek-ai/deepseek-llm-7b-chat"
    assert cfg.roles.critic.ppo_micro_batch_size_per_device == 32 and cfg.roles.critic.model.gradient_checkpointing
    assert not cfg.roles.critic.model.use_remove_padding and not cfg.roles.trainer.use_kl_loss
    assert cfg.trainer.n_gpus == 16  # 8 per node x 2 nodes
    assert cfg.trainer.total_steps == 2 and cfg.trainer.logger == ["console"]
    unmapped = dict(result.unmapped)
    assert "trainer.nnodes=2" in unmapped and "cluster.address" in " ".join(result.notes)
    assert "trainer.use_legacy_worker_impl=False" in unmapped
    assert sum("offload" in key for key in unmapped) == 4


def test_unknown_keys_and_unsupported_values_are_reported_not_dropped():
    result = translate(
        [
            "python3",
            "-m",
            "verl.trainer.main_ppo",
            "actor_rollout_ref.rollout.name=sglang",
            "+actor_rollout_ref.actor.made_up=1",
            "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.1",
        ]
    )
    unmapped = dict(result.unmapped)
    assert "SGLang" not in unmapped["actor_rollout_ref.rollout.name=sglang"]  # the reason names what rlmesh has
    assert "vllm" in unmapped["actor_rollout_ref.rollout.name=sglang"]
    assert "actor_rollout_ref.actor.made_up=1" in unmapped
    assert "lr_warmup_steps" in unmapped["actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.1"]
    assert result.overrides == ["recipe=ppo_gsm8k"]  # no estimator given: verl's default, GAE


def test_every_mapped_key_exists_in_rlmesh_and_every_unmapped_one_says_why():
    schema = OmegaConf.structured(RlmeshConfig)
    for entry in KEYS:
        assert entry.rlmesh or entry.reason, entry.verl
        for key in entry.rlmesh:
            if key in ("rollout", "reward"):  # config groups: rollout=vllm, reward=model
                assert (REPO / "configs" / key).is_dir()
                continue
            parent, _, leaf = key.rpartition(".")
            assert leaf in OmegaConf.select(schema, parent).keys(), key  # noqa: SIM118  # "???" is not "in" it


def test_overrides_are_read_from_a_script_with_continuations_and_comments():
    assert verl_overrides("set -x\n# a comment\npython3 -m verl.trainer.main_ppo \\\n  a.b=1 \\\n  c=2 $@\n") == [
        "a.b=1",
        "c=2",
    ]
    assert verl_overrides(["data.train_batch_size=8"]) == ["data.train_batch_size=8"]  # an override list


def test_the_docs_table_is_the_translators(tmp_path: Path):
    doc = (REPO / "docs" / "from-verl.md").read_text()
    assert key_table() in doc


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    script = tmp_path / "run.sh"
    script.write_text(VERL_GRPO)
    assert main(["from-verl", "-f", str(script)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("python -m rlmesh.train recipe=grpo_gsm8k ")
    assert '"data.train_files=[$HOME/data/gsm8k/train.parquet]"' in out  # $HOME stays for the user's shell
    assert "not mapped: actor_rollout_ref.actor.fsdp_config.param_offload=False" in err
    assert main(["from-verl", "--strict", "-f", str(script)]) == 1
    # the printed command runs: rlmesh composes it (--cfg job prints the config without starting anything)
    printed = subprocess.run(
        ["bash", "-c", out.strip() + " --cfg job"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"HOME": "/home/user", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "train_files:\n  - /home/user/data/gsm8k/train.parquet" in printed.stdout


def test_sampled_validation_keeps_its_temperature_and_verl_truncation_names_are_translated():
    result = translate(
        [
            "actor_rollout_ref.rollout.val_kwargs.temperature=0.6",
            "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
            "data.truncation=left",
            "data.max_prompt_length=${max_prompt_length}",
            "data.max_response_length=${max_response_length}",
        ]
    )
    assert "roles.rollout.val_sampling.temperature=0.6" in result.overrides
    assert not any(o.startswith("roles.rollout.val_sampling.temperature=1") for o in result.overrides)
    assert "data.truncation=truncate_left" in result.overrides
    assert any("max_model_len" in note for note in result.notes)  # shell variables: not added up, but said
    greedy = translate(["actor_rollout_ref.rollout.val_kwargs.do_sample=False"])
    assert greedy.overrides[-1] == "roles.rollout.val_sampling.temperature=0.0"
