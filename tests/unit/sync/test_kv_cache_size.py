"""The CPU engine's KV cache is sized from what it must hold, never from a fraction of the NUMA node's memory."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from rlmesh.config import ModelConfig, RolloutConfig
from rlmesh.roles.rollout.kv_cache import CPU_BLOCK_TOKENS, KV_HEADROOM, host_memory, kv_bytes_per_token, kv_cache_need
from rlmesh.roles.rollout.vllm import engine_kv_cache, engine_settings
from tests.conftest import REPO

TINY = str(REPO / "rlmesh" / "assets" / "tiny-arith")


def test_bytes_per_token_count_keys_and_values_of_every_layer():
    config = AutoConfig.from_pretrained(TINY)  # 4 layers, 2 KV heads of 64
    assert kv_bytes_per_token(config, "float32") == 2 * 4 * 2 * 64 * 4
    assert kv_bytes_per_token(config, "bfloat16") == 2 * 4 * 2 * 64 * 2


def test_every_sequence_gets_whole_blocks_plus_headroom_unless_the_user_sets_the_size():
    config = AutoConfig.from_pretrained(TINY)
    need = kv_cache_need(hf_config=config, dtype="float32", max_num_seqs=256, max_model_len=32, explicit_gb=None)
    assert need.tokens_per_seq == CPU_BLOCK_TOKENS  # 32 tokens still take one 128-token block
    assert need.bytes == int(256 * CPU_BLOCK_TOKENS * 4096 * KV_HEADROOM)
    longer = kv_cache_need(hf_config=config, dtype="float32", max_num_seqs=256, max_model_len=None, explicit_gb=None)
    assert longer.tokens_per_seq == 128  # None: the model's max_position_embeddings
    config.max_position_embeddings = 300  # where 32 and the model's length would no longer round alike
    longest = kv_cache_need(hf_config=config, dtype="float32", max_num_seqs=256, max_model_len=None, explicit_gb=None)
    assert longest.tokens_per_seq == 3 * CPU_BLOCK_TOKENS
    explicit = kv_cache_need(hf_config=config, dtype="float32", max_num_seqs=256, max_model_len=32, explicit_gb=0.5)
    assert explicit.bytes == 1 << 29 and explicit.explicit


def test_the_default_engine_on_cpu_asks_for_an_explicit_size_and_on_gpu_for_a_fraction():
    rollout, model = RolloutConfig(max_model_len=32, max_num_seqs=256), ModelConfig(path=TINY, dtype="float32")
    settings = engine_settings(rollout, model, seed=0, device="cpu")
    assert settings["kv_cache_memory_bytes"] == engine_kv_cache(rollout, model, "cpu").bytes  # type: ignore[union-attr]
    assert settings["load_format"] == "safetensors"
    assert engine_kv_cache(rollout, model, "cuda") is None  # gpu_memory_utilization of the free device memory


def test_host_memory_reads_this_machine():
    import psutil

    memory, total = host_memory(), psutil.virtual_memory().total
    assert 0 < memory.available_bytes <= total
    if Path("/sys/devices/system/node/node0/meminfo").exists():  # the node's figure must have been read
        assert memory.node is not None
    if memory.node is not None:  # a NUMA node holds part of the machine's memory at most
        assert memory.node_available_bytes is not None and 0 < memory.node_available_bytes <= total
