"""Role contracts: the plan reads each role's class (endpoints, capabilities, constructor), not a name string."""

from __future__ import annotations

from typing import Any

import pytest

import rlmesh.train  # noqa: F401  - registers the config schema that compose_config reads
from rlmesh.algo import estimator_needs, register_advantage
from rlmesh.algo.advantages import ADVANTAGE_ESTIMATORS, ESTIMATOR_NEEDS, compute_grpo_advantage
from rlmesh.config_checks import ConfigError, check_config
from rlmesh.data import Batch
from rlmesh.mesh import endpoint
from rlmesh.roles.contracts import (
    CollectivePolicyLearner,
    CollectiveRollout,
    Rollout,
    Scorer,
    SleepingRollout,
    capabilities_of,
    contract_problems,
)
from rlmesh.roles.critic import Critic
from rlmesh.roles.reward import ModelReward, RuleReward
from rlmesh.roles.rollout.hf import HFRollout
from rlmesh.roles.rollout.vllm import VLLMRollout
from rlmesh.roles.trainer import PolicyTrainer
from tests.conftest import compose_config


def load(*overrides: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose_config(*overrides))


class GoodScorer:
    def __init__(self, config: Any, *, tokenizer_path: str, max_response_length: int) -> None:
        pass

    @endpoint
    def score(self, batch: Batch) -> Batch:
        return batch


class TwoArgumentScorer:
    def __init__(self, config: Any, *, tokenizer_path: str, max_response_length: int) -> None:
        pass

    @endpoint
    def score(self, batch: Batch, weights: list[float]) -> Batch:
        return batch


class PlainScorer:
    def __init__(self, config: Any) -> None:  # lacks the role's constructor arguments
        pass

    def score(self, batch: Batch) -> Batch:  # not an @endpoint
        return batch


SCORER_ARGS = {"config": None, "tokenizer_path": "x", "max_response_length": 4}


def test_a_class_that_provides_the_endpoints_and_constructor_has_no_problems():
    assert contract_problems(GoodScorer, Scorer, SCORER_ARGS) == []


def test_missing_undecorated_and_mismatched_endpoints_are_named():
    problems = contract_problems(PlainScorer, Scorer, SCORER_ARGS)
    assert any("PlainScorer has no endpoint score(batch) (is not marked @endpoint)" in p for p in problems)
    assert any("cannot be constructed" in p and "tokenizer_path" in p for p in problems)
    (problem,) = contract_problems(TwoArgumentScorer, Scorer, SCORER_ARGS)
    assert "TwoArgumentScorer.score cannot be called as score(batch)" in problem and "weights" in problem
    (missing,) = contract_problems(GoodScorer, Rollout, {"config": None})[:1]
    assert "has no endpoint generate(prompt_ids, n, sampling, seed) (is missing)" in missing


def test_rlmesh_role_classes_satisfy_their_contracts():
    rollout_args = {"config": None, "model": None, "seed": 1, "device": "cpu"}
    for contract in (Rollout, CollectiveRollout, SleepingRollout):
        assert contract_problems(VLLMRollout, contract, rollout_args) == []
    assert contract_problems(HFRollout, Rollout, rollout_args) == []
    assert contract_problems(HFRollout, CollectiveRollout, rollout_args) != []  # it joins no weight-sync group
    learner_args = {"config": None, "rollout_n": 2, "total_training_steps": 1, "seed": 1, "device": "cpu"}
    assert contract_problems(PolicyTrainer, CollectivePolicyLearner, learner_args) == []
    assert contract_problems(Critic, CollectivePolicyLearner, learner_args) != []
    assert contract_problems(RuleReward, Scorer, SCORER_ARGS) == []
    assert contract_problems(ModelReward, Scorer, {**SCORER_ARGS, "device": "cpu"}) == []


def test_capabilities_are_read_from_class_attributes_with_defaults():
    assert capabilities_of(GoodScorer).weight_transports == ("object_store",)
    assert capabilities_of(GoodScorer).needs_gpu and not capabilities_of(RuleReward).needs_gpu
    assert capabilities_of(GoodScorer).takes_device is False  # no `device` parameter
    assert capabilities_of(ModelReward).takes_device is True
    assert capabilities_of(VLLMRollout).supports_sleep and not capabilities_of(HFRollout).supports_sleep
    assert "gloo" in capabilities_of(VLLMRollout).weight_transports


def test_the_plan_reads_the_class_not_a_name():
    plan = check_config(load(), gpus_available=0)
    assert plan.role("rollout").cls is VLLMRollout and plan.weight_sync == "gloo"
    assert plan.role("rollout").contracts == (Rollout, CollectiveRollout)
    assert plan.role("reward").kwargs.keys() == {"config", "tokenizer_path", "max_response_length"}  # no device
    user = check_config(load("roles.rollout._target_=tests.unit.roles.test_role_contracts.EchoRollout"), 0)
    assert user.weight_sync == "object_store"  # the class moves weights through the object store only
    assert user.role("rollout").cls.__name__ == "EchoRollout" and user.role("rollout").kwargs["device"] == "cpu"
    with pytest.raises(ConfigError, match=r"moves weights over \['object_store'\] only, not gloo"):
        check_config(
            load(
                "roles.rollout._target_=tests.unit.roles.test_role_contracts.EchoRollout",
                "roles.rollout.weight_sync=gloo",
            ),
            gpus_available=0,
        )


class EchoRollout:
    """A user rollout that declares no capabilities (so: object store, and a device because __init__ takes one)."""

    def __init__(self, config: Any, model: Any, *, seed: int, device: str) -> None:
        pass

    @endpoint
    def generate(self, prompt_ids: list[int], n: int, sampling: Any = None, seed: int | None = None) -> list[Any]:
        return []

    @endpoint
    def load_weights(self, weights: dict[str, Any], version: int) -> None:
        pass

    @endpoint
    def weight_version(self) -> int:
        return 0


def test_estimators_declare_what_they_need_where_they_are_registered():
    assert estimator_needs("gae").values and estimator_needs("grpo").groups and estimator_needs("remax").baseline
    assert not estimator_needs("reinforce_plus_plus").groups
    assert check_config(
        load("algorithm.adv_estimator=remax", "roles.rollout.n=1", "roles.trainer.ppo_micro_batch_size_per_device=8"),
        gpus_available=0,
    )
    with pytest.raises(ConfigError, match=r"roles.rollout.n=1: grpo compares samples"):
        check_config(load("roles.rollout.n=1"), gpus_available=0)
    register_advantage("grpo_with_values", needs_values=True)(compute_grpo_advantage)
    try:
        plan = check_config(load("algorithm.adv_estimator=grpo_with_values"), gpus_available=0)
        assert plan.use_critic  # turned on by what the estimator declared
    finally:
        del ADVANTAGE_ESTIMATORS["grpo_with_values"], ESTIMATOR_NEEDS["grpo_with_values"]


class GlooOnlyRollout(VLLMRollout):
    """vLLM's endpoints, but weights only over the object store or gloo (say, a build without NCCL)."""

    weight_transports = ("object_store", "gloo")


GPU_RUN = (
    "trainer.device=cuda",
    "trainer.n_gpus=1",
    "+roles.trainer.resources_per_device.GPU=1",
    "+roles.rollout.resources_per_engine.GPU=1",
)


def test_auto_picks_a_transport_both_classes_share_and_falls_back_to_the_object_store():
    gloo_only = "roles.rollout._target_=tests.unit.roles.test_role_contracts.GlooOnlyRollout"
    assert check_config(load(gloo_only), gpus_available=0).weight_sync == "gloo"
    assert check_config(load(gloo_only, *GPU_RUN), gpus_available=1).weight_sync == "object_store"  # no nccl


def test_a_user_scorer_needs_no_gpu_unless_it_says_so():
    user_scorer = "roles.reward._target_=tests.unit.roles.test_role_contracts.GoodScorer"
    assert check_config(load(user_scorer, *GPU_RUN), gpus_available=1).role("reward").capabilities.needs_gpu is False
    with pytest.raises(ConfigError, match=r"roles.reward.resources_per_actor=.*asks Ray for no GPU"):
        check_config(load("reward=model", *GPU_RUN), gpus_available=1)


def test_sleep_mode_needs_a_rollout_that_declares_it():
    with pytest.raises(ConfigError, match="HFRollout does not declare supports_sleep"):
        check_config(load("rollout=hf", "roles.rollout.enable_sleep_mode=true", *GPU_RUN), gpus_available=1)


def test_a_critic_that_never_trains_is_named_not_misreported_as_a_bad_class():
    with pytest.raises(ConfigError) as info:
        check_config(load("recipe=ppo", "roles.critic.ppo_epochs=0"), gpus_available=0)
    assert info.value.problems == ["roles.critic.ppo_epochs=0: must be at least 1. Fix: use a positive number"]
    plan = check_config(load("recipe=ppo"), gpus_available=0)
    assert plan.role("critic").learner and plan.role("trainer").learner and not plan.role("reward").learner


def test_engine_dtypes_are_checked_before_any_actor_starts():
    with pytest.raises(ConfigError, match=r"roles.rollout.dtype='half': unknown dtype"):
        check_config(load("roles.rollout.dtype=half"), gpus_available=0)
