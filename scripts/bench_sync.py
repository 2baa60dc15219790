"""Benchmark bucketed weight sync against a raw single-buffer transfer of the same bytes, and a real engine's load.

    python scripts/bench_sync.py                 # CPU: gloo between two Ray actors; tiny and 0.5B-shaped models
    python scripts/bench_sync.py --gpu           # also nccl (2+ GPUs) and cuda_ipc (1 GPU), 0.5B and 7B bf16 shapes
    python scripts/bench_sync.py --no-engine     # skip the real vLLM engine (tiny model) load measurement

Prints median seconds (and their min-max over the repeats), GB/s and the two ratios the issue targets: sync / raw (at
most 1.3) and 1,000 small tensors / one big tensor of the same bytes (at most 1.5, with each repeat's ratio's range).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlmesh.mesh import ActorMesh, create_collective_group, endpoint, get_group  # noqa: E402
from rlmesh.sync.buckets import unpack  # noqa: E402
from rlmesh.sync.manifest import SyncPlan, TensorSpec, tensor_specs  # noqa: E402
from rlmesh.sync.sender import member_group, send_weights  # noqa: E402
from rlmesh.sync.transports import make_receiver, wait_work  # noqa: E402

# ---------------------------------------------------------------- model shapes


def qwen2_specs(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool, dtype: str
) -> list[TensorSpec]:
    """The tensors of a Qwen2-architecture model in Hugging Face order (q/k/v have biases)."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    specs: list[TensorSpec] = [("model.embed_tokens.weight", dtype, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", dtype, (hidden, hidden)),
            (p + "self_attn.q_proj.bias", dtype, (hidden,)),
            (p + "self_attn.k_proj.weight", dtype, (kv, hidden)),
            (p + "self_attn.k_proj.bias", dtype, (kv,)),
            (p + "self_attn.v_proj.weight", dtype, (kv, hidden)),
            (p + "self_attn.v_proj.bias", dtype, (kv,)),
            (p + "self_attn.o_proj.weight", dtype, (hidden, hidden)),
            (p + "mlp.gate_proj.weight", dtype, (intermediate, hidden)),
            (p + "mlp.up_proj.weight", dtype, (intermediate, hidden)),
            (p + "mlp.down_proj.weight", dtype, (hidden, intermediate)),
            (p + "input_layernorm.weight", dtype, (hidden,)),
            (p + "post_attention_layernorm.weight", dtype, (hidden,)),
        ]
    specs.append(("model.norm.weight", dtype, (hidden,)))
    if not tied:
        specs.append(("lm_head.weight", dtype, (vocab, hidden)))
    return specs


MODELS: dict[str, Any] = {
    # rlmesh/models/tiny.py with 2 layers (the test model): 0.53 M parameters
    "tiny": lambda dtype: qwen2_specs(128, 512, 2, 2, 2, 17, True, dtype),
    # Qwen2.5-0.5B: 494 M parameters, tied embeddings
    "0.5b": lambda dtype: qwen2_specs(896, 4864, 24, 14, 2, 151936, True, dtype),
    # Qwen2.5-7B: 7.6 B parameters, separate lm_head
    "7b": lambda dtype: qwen2_specs(3584, 18944, 28, 28, 4, 152064, False, dtype),
}


def equal_split_specs(total_bytes: int, count: int, dtype: str) -> list[TensorSpec]:
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    numel = total_bytes // itemsize // count
    return [(f"t{i}", dtype, (numel,)) for i in range(count)]


# ---------------------------------------------------------------- the two peers


class Peer:
    """Rank 0 sends, rank 1 receives. Each timed run is fenced by barriers, so it covers the whole transfer."""

    def __init__(self, device: str) -> None:
        if device == "cuda":
            torch.cuda.set_device(0)
        self.device = torch.device(device)
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.targets: dict[str, torch.Tensor] = {}

    @endpoint
    def prepare(self, specs: list[TensorSpec], sender: bool) -> None:
        """The sender's random tensors; the receiver's destinations, which it copies into as an engine loads."""
        self.tensors, self.targets = [], {}
        generator = torch.Generator(device=self.device).manual_seed(0)
        for name, dtype, shape in specs:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            if sender:
                tensor.uniform_(generator=generator)
                self.tensors.append((name, tensor))
            else:
                self.targets[name] = tensor

    @endpoint
    def sync(self, group_name: str, plan: SyncPlan, repeats: int, copy_out: bool) -> list[float]:
        """copy_out: the receiver copies every tensor into its own (as an engine's load does); otherwise it only
        receives, which is what the raw transfer does too."""
        group = get_group(group_name)
        times = []
        for version in range(repeats):
            group.barrier()
            started = time.perf_counter()
            if group.rank == 0:
                send_weights(self.tensors, plan, group, version=version, device=self.device)
            else:
                receiver = make_receiver(group, plan, self.device)
                receiver.start()
                for k, buffer in receiver.buckets():
                    for name, view in unpack(buffer, plan.bucket(k)):
                        if copy_out:
                            self.targets[name].copy_(view, non_blocking=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
            group.barrier()
            times.append(time.perf_counter() - started)
        return times

    @endpoint
    def raw(self, group_name: str, nbytes: int, repeats: int, ipc: bool) -> list[float]:
        """One flat buffer of `nbytes`: broadcast over the group, or for IPC shared once and copied by the receiver."""
        group = get_group(group_name)
        flat = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        times = []
        for _ in range(repeats):
            group.barrier()
            started = time.perf_counter()
            if ipc:
                _raw_ipc(group, flat)
            else:
                wait_work(group.broadcast_async(flat), group, "raw broadcast")
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
            group.barrier()
            times.append(time.perf_counter() - started)
        return times


class ModelSender:
    """A trainer stand-in holding a Hugging Face model, with the endpoints CollectiveWeightSync calls."""

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    @endpoint
    def weight_specs(self) -> list[TensorSpec]:
        return tensor_specs(self.model.state_dict().items())

    @endpoint
    def push_weights(self, group_name: str, plan: SyncPlan, version: int) -> dict[str, float]:
        return send_weights(self.model.state_dict().items(), plan, member_group(group_name), version=version)


def _raw_ipc(group: Any, flat: torch.Tensor) -> None:
    import pickle

    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

    from rlmesh.sync.transports import _broadcast_bytes

    payload = pickle.dumps(reduce_tensor(flat)[1]) if group.rank == 0 else b""
    args = pickle.loads(_broadcast_bytes(group, payload, "raw ipc handle"))
    if group.rank != 0:
        shared = rebuild_cuda_tensor(*args)
        flat.copy_(shared)
        torch.cuda.synchronize()
        del shared


# ---------------------------------------------------------------- runs


def run_transfer(
    label: str, transport: str, device: str, specs: list[TensorSpec], bucket_mb: float, repeats: int
) -> tuple[dict[str, Any], list[float]]:
    pg_backend = "nccl" if transport == "nccl" else "gloo"
    resources: dict[str, float] = {"CPU": 0.5}
    if device == "cuda":
        # nccl: one GPU each; cuda_ipc: both on the same GPU
        resources["GPU"] = 1.0 if transport == "nccl" else 0.5
    sender = ActorMesh(Peer, 1, args=(device,), resources=resources, name="sender")
    receiver = ActorMesh(Peer, 1, args=(device,), resources=resources, name="receiver", distributed_env=False)
    try:
        group = create_collective_group([sender, receiver], backend=pg_backend, name="bench", timeout_s=600)
        plan = SyncPlan.build(specs, bucket_bytes=int(bucket_mb * (1 << 20)), transport=transport)
        sender.prepare.call_one(specs, True).result(timeout=600)
        receiver.prepare.call_one(specs, False).result(timeout=600)
        # one untimed run each warms up connections, allocators and page faults
        runs = {}
        for copy_out in (False, True):
            synced = [
                sender.sync.call_one("bench", plan, repeats + 1, copy_out),
                receiver.sync.call_one("bench", plan, repeats + 1, copy_out),
            ]
            runs[copy_out] = synced[0].result(timeout=3600)[1:]
            synced[1].result(timeout=600)
        sync_times, load_times = runs[False], runs[True]
        ipc = transport == "cuda_ipc"
        raws = [
            sender.raw.call_one("bench", plan.total_bytes, repeats + 1, ipc),
            receiver.raw.call_one("bench", plan.total_bytes, repeats + 1, ipc),
        ]
        raw_times = raws[0].result(timeout=3600)[1:]
        raws[1].result(timeout=600)
        group.destroy()
    finally:
        sender.shutdown()
        receiver.shutdown()
    sync_s, raw_s = statistics.median(sync_times), statistics.median(raw_times)
    return {
        "case": label,
        "transport": transport,
        "tensors": len(plan.slots),
        "MB": plan.total_bytes / 1e6,
        "buckets": plan.num_buckets,
        "sync_s": sync_s,
        "raw_s": raw_s,
        "sync_GB/s": plan.total_bytes / sync_s / 1e9,
        "raw_GB/s": plan.total_bytes / raw_s / 1e9,
        "sync/raw": sync_s / raw_s,
        "sync+copy_out_s": statistics.median(load_times),
        "sync_spread_s": f"{min(sync_times):.3f}-{max(sync_times):.3f}",
    }, sync_times


def run_engine(repeats: int) -> dict[str, Any]:
    """A real vLLM engine (CPU or GPU) on the tiny test model: the whole push, and the load inside the engine."""
    from rlmesh.config import ModelConfig, RolloutConfig
    from rlmesh.models.tiny import build_char_tokenizer, build_tiny_qwen2, save_tiny_model
    from rlmesh.roles.rollout.vllm import VLLMRollout, close_engines
    from rlmesh.sync.collective_sync import CollectiveWeightSync

    folder = Path(tempfile.mkdtemp(prefix="bench-sync-tiny-"))
    tokenizer = build_char_tokenizer()
    save_tiny_model(build_tiny_qwen2(tokenizer, seed=0, num_hidden_layers=2), tokenizer, folder)
    config = RolloutConfig(dtype="float32", max_model_len=128, max_num_seqs=16, kv_cache_memory_gb=0.0625)
    sender = ActorMesh(ModelSender, 1, args=(str(folder),), resources={"CPU": 0.5}, name="trainer")
    rollout = ActorMesh(
        VLLMRollout,
        1,
        args=(config, ModelConfig(path=str(folder))),
        kwargs={"seed": 0, "device": "cpu"},
        resources={"CPU": 1},
        name="rollout",
        distributed_env=False,
    )
    sync = CollectiveWeightSync(sender, rollout, transport="gloo", bucket_mb=256, timeout_s=60)
    try:
        sync.setup()
        runs = [sync.push(version) for version in range(1, repeats + 2)][1:]
    finally:
        sync.close()
        close_engines(rollout)
        sender.shutdown()
    return {
        "case": "tiny, real vLLM engine",
        "push_s": statistics.median(r["timing_s/sync_transfer"] for r in runs),
        "send_s": statistics.median(r["weight_sync/send_s"] for r in runs),
        "engine_load_s": statistics.median(r["weight_sync/load_s_max"] for r in runs),
        "MB": runs[0]["weight_sync/bytes"] / 1e6,
    }


def ratio_spread(numerators: list[float], denominators: list[float]) -> str:
    """min-max of each repeat's ratio (the small run over the big run of the same index)."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_fmt(row[k]) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(" | ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.0f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="also nccl and cuda_ipc on GPUs, with a 7B-shaped model")
    parser.add_argument("--bucket-mb", type=float, default=256, help="bucket size (rollout.sync_bucket_mb)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the 0.5B-shaped tensors")
    parser.add_argument("--no-engine", action="store_true", help="skip the real vLLM engine measurement")
    args = parser.parse_args()

    import ray

    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}},
    )
    cases: list[tuple[str, str, str, list[TensorSpec]]] = [
        ("tiny fp32", "gloo", "cpu", MODELS["tiny"]("float32")),
        (f"0.5B {args.dtype}", "gloo", "cpu", MODELS["0.5b"](args.dtype)),
    ]
    split_bytes = 256 << 20
    count_cases = [("gloo", "cpu")]
    if args.gpu:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        gpu_transports = (["nccl"] if gpus >= 2 else []) + (["cuda_ipc"] if gpus >= 1 else [])
        for transport in gpu_transports:
            cases.append((f"0.5B {args.dtype}", transport, "cuda", MODELS["0.5b"](args.dtype)))
            cases.append(("7B bfloat16", transport, "cuda", MODELS["7b"]("bfloat16")))
            count_cases.append((transport, "cuda"))
    rows = []
    for label, transport, device, specs in cases:
        rows.append(run_transfer(label, transport, device, specs, args.bucket_mb, args.repeats)[0])
        print_table(rows[-1:])
    counts = []
    for transport, device in count_cases:
        many, many_times = run_transfer(
            "1000 small",
            transport,
            device,
            equal_split_specs(split_bytes, 1000, "float32"),
            args.bucket_mb,
            args.repeats,
        )
        one, one_times = run_transfer(
            "1 big", transport, device, equal_split_specs(split_bytes, 1, "float32"), args.bucket_mb, args.repeats
        )
        counts.append(
            {
                "transport": transport,
                "MB": many["MB"],
                "1000_small_s": many["sync_s"],
                "small_spread_s": many["sync_spread_s"],
                "1_big_s": one["sync_s"],
                "big_spread_s": one["sync_spread_s"],
                "small/big": many["sync_s"] / one["sync_s"],
                "small/big_spread": ratio_spread(many_times, one_times),
            }
        )
    print("\nsync against a raw single-buffer transfer of the same bytes (target sync/raw <= 1.3)")
    print_table(rows)
    print("\n1,000 small tensors against 1 big one of the same bytes (target small/big <= 1.5)")
    print_table(counts)
    if not args.no_engine:
        print("\nreal vLLM engine (tiny model, gloo): whole push, and the load inside the engine")
        print_table([run_engine(args.repeats)])
    ray.shutdown()


if __name__ == "__main__":
    main()
