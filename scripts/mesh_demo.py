"""Two SPMD meshes exchanging tensors: a dp=2 trainer mesh all-reduces gradients with torch.distributed, then its
rank 0 broadcasts the state dict to every actor of a rollout mesh over a cross-mesh gloo group.

Run: python scripts/mesh_demo.py   (starts and stops a local Ray cluster; CPU only)
"""

from __future__ import annotations

import time

import ray
import torch
import torch.distributed as dist

from rlmesh.mesh import ActorMesh, create_collective_group, current_rank, endpoint, get_group


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


class Trainer:
    def __init__(self) -> None:
        dist.init_process_group("gloo")  # RANK/WORLD_SIZE/MASTER_* come from the mesh
        self.model = tiny_model()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)

    @endpoint
    def train_step(self, xs: torch.Tensor, ys: torch.Tensor) -> float:
        loss = torch.nn.functional.mse_loss(self.model(xs), ys)
        self.opt.zero_grad()
        loss.backward()
        for p in self.model.parameters():  # data-parallel: average gradients over the dp ranks
            assert p.grad is not None
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        self.opt.step()
        return float(loss)

    @endpoint
    def push_weights(self, group: str) -> float:
        handle = get_group(group)
        for tensor in self.model.state_dict().values():
            handle.broadcast(tensor.contiguous(), src=0)
        return checksum(self.model)


class Rollout:
    def __init__(self) -> None:
        self.model = tiny_model()
        torch.nn.init.zeros_(self.model[0].weight)  # start different from the trainer

    @endpoint
    def pull_weights(self, group: str) -> float:
        handle = get_group(group)
        with torch.no_grad():
            for tensor in self.model.state_dict().values():
                handle.broadcast(tensor, src=0)
        return checksum(self.model)

    @endpoint
    def rank(self) -> int:
        return current_rank().rank


def checksum(model: torch.nn.Module) -> float:
    return float(sum(p.double().sum() for p in model.state_dict().values()))


def main() -> None:
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        trainer = ActorMesh(Trainer, {"dp": 2}, resources={"CPU": 0.5}, name="trainer")
        rollout = ActorMesh(Rollout, {"dp": 2}, resources={"CPU": 0.5}, name="rollout", distributed_env=False)
        xs, ys = torch.randn(64, 16), torch.randn(64, 4)
        for step in range(3):
            losses = trainer.train_step.shard(xs, ys).result()
            print(f"step {step}: loss per dp rank {[round(v, 4) for v in losses]}")
        group = create_collective_group([trainer[0], rollout], backend="gloo", name="weights", timeout_s=30)
        t0 = time.perf_counter()
        sent = trainer[0].push_weights.call_one("weights")
        received = rollout.pull_weights.all("weights").result()
        print(f"trainer rank 0 checksum {sent.result():.6f}; rollout checksums {[round(r, 6) for r in received]}")
        print(f"broadcast to {rollout.size} rollout actors in {1e3 * (time.perf_counter() - t0):.1f} ms")
        assert all(abs(r - sent.result()) < 1e-9 for r in received), "rollout weights differ from the trainer's"
        group.destroy()
        trainer.shutdown()
        rollout.shutdown()
        print("ok: the rollout mesh serves the trainer's weights")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
