"""How much KV cache a CPU vLLM engine needs, and how much memory this host really has to give it.

vLLM-CPU sizes its cache as `gpu_memory_utilization × the NUMA node's memory − the worker's RSS` unless told the size.
NUMA nodes on these VMs report far less than /proc/meminfo (8.5 of 24 GiB measured), so a fraction that works on one
machine is negative on the next. rlmesh therefore always tells vLLM-CPU the size: what `max_num_seqs` sequences of
`max_model_len` tokens need, with headroom.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlmesh.sync.manifest import torch_dtype

# vLLM-CPU's default KV block (vllm/platforms/cpu.py, 0.32): every sequence holds whole blocks.
CPU_BLOCK_TOKENS = 128
# A quarter more than the exact need: the cache then never limits concurrency, and stays small next to the weights.
KV_HEADROOM = 1.25
GIB = float(1 << 30)
NODE_MEMINFO = "/sys/devices/system/node/node{node}/meminfo"


@dataclass(frozen=True)
class KVCacheNeed:
    """What one engine's KV cache must hold, and the bytes it takes."""

    bytes: int
    bytes_per_token: int
    max_num_seqs: int
    tokens_per_seq: int  # max_model_len rounded up to whole blocks
    explicit: bool  # the user set roles.rollout.kv_cache_memory_gb

    def describe(self) -> str:
        if self.explicit:
            return f"{self.bytes / GIB:.3f} GiB (roles.rollout.kv_cache_memory_gb)"
        return (
            f"{self.bytes / GIB:.3f} GiB = max_num_seqs {self.max_num_seqs} × {self.tokens_per_seq} tokens × "
            f"{self.bytes_per_token} bytes/token × {KV_HEADROOM} headroom"
        )


def kv_bytes_per_token(hf_config: Any, dtype: str) -> int:
    """Bytes of K and V one token takes over all layers: 2 × layers × KV heads × head dim × bytes per value."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return 2 * int(text.num_hidden_layers) * kv_heads * head_dim * torch_dtype(dtype).itemsize


def model_max_len(hf_config: Any) -> int:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return int(getattr(text, "max_position_embeddings", 0) or 2048)


def kv_cache_need(
    *, hf_config: Any, dtype: str, max_num_seqs: int, max_model_len: int | None, explicit_gb: float | None
) -> KVCacheNeed:
    """The KV cache one CPU engine gets: `explicit_gb` when the user set it, else room for `max_num_seqs` sequences of
    `max_model_len` tokens (the model's own limit when None), in whole blocks, with KV_HEADROOM."""
    per_token = kv_bytes_per_token(hf_config, dtype)
    length = max_model_len or model_max_len(hf_config)
    tokens = math.ceil(length / CPU_BLOCK_TOKENS) * CPU_BLOCK_TOKENS
    if explicit_gb is not None:
        return KVCacheNeed(int(explicit_gb * GIB), per_token, max_num_seqs, tokens, explicit=True)
    need = math.ceil(max_num_seqs * tokens * per_token * KV_HEADROOM)
    return KVCacheNeed(need, per_token, max_num_seqs, tokens, explicit=False)


# ------------------------------------------------------------------------------------------- host memory


@dataclass(frozen=True)
class HostMemory:
    """Memory available now: to the whole host (/proc/meminfo) and on the NUMA node vLLM-CPU allocates from."""

    available_bytes: int
    node: int | None
    node_available_bytes: int | None


def host_memory() -> HostMemory:
    """What vLLM-CPU will find: the node of this process's first allowed CPU, and its free + reclaimable memory,
    computed as vLLM does (vllm/utils/cpu_resource_utils.py)."""
    import psutil

    available = int(psutil.virtual_memory().available)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    node = _numa_node_of_cpu(cpus[0]) if cpus else None
    if node is None:
        return HostMemory(available, None, None)
    meminfo = Path(NODE_MEMINFO.format(node=node))
    try:
        fields = {}
        for line in meminfo.read_text().splitlines():
            parts = line.split()  # "Node 0 MemFree: 5132324 kB"
            fields[parts[2].rstrip(":")] = int(parts[3]) * 1024
        node_available = sum(fields[k] for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable"))
    except (OSError, KeyError, IndexError, ValueError):
        return HostMemory(available, None, None)
    return HostMemory(available, node, node_available)


def _numa_node_of_cpu(cpu: int) -> int | None:
    links = sorted(Path(f"/sys/devices/system/cpu/cpu{cpu}").glob("node[0-9]*"))
    if links:
        return int(links[0].name.removeprefix("node"))
    return 0 if Path(NODE_MEMINFO.format(node=0)).is_file() else None
