"""Rollout backends: Hugging Face generate (hf) and vLLM engines (vllm), with one Sample format."""

from rlmesh.roles.rollout.base import Sample, sampling_seed

__all__ = ["Sample", "sampling_seed"]
