"""rlmesh.algo on a CUDA device gives the CPU results: no op silently moves to the host or mixes devices."""

import pytest
import torch

from rlmesh.algo import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    apply_kl_penalty,
    entropy_from_logits,
    entropy_from_logits_chunked,
    get_advantage_estimator,
    get_policy_loss,
    kl_loss,
    logprobs_from_logits,
    value_loss,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU tests cover the formulas"),
]


def batch(device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "rewards": torch.randn(8, 16, generator=generator),
        "values": torch.randn(8, 16, generator=generator),
        "old": -torch.rand(8, 16, generator=generator) * 3,
        "new": -torch.rand(8, 16, generator=generator) * 3,
        "advantages": torch.randn(8, 16, generator=generator),
        "mask": torch.rand(8, 16, generator=generator) < 0.8,
        "baseline": torch.randn(8, generator=generator),
        "group_ids": torch.arange(8) // 4,
    }
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def test_every_estimator_loss_and_kl_variant_matches_cpu_on_cuda() -> None:
    cpu, cuda = batch("cpu"), batch("cuda")
    for name in ADVANTAGE_ESTIMATORS:
        outputs = {}
        for device, data in (("cpu", cpu), ("cuda", cuda)):
            outputs[device] = get_advantage_estimator(name)(
                data["rewards"],
                data["mask"],
                group_ids=data["group_ids"],
                values=data["values"],
                baseline_rewards=data["baseline"],
                gamma=0.99,
                lam=0.95,
            )
        for on_cpu, on_cuda in zip(outputs["cpu"], outputs["cuda"], strict=True):
            assert on_cuda.device.type == "cuda", name
            torch.testing.assert_close(on_cuda.cpu(), on_cpu, msg=name)
    for name in POLICY_LOSSES:
        cpu_loss, cpu_metrics = get_policy_loss(name)(cpu["old"], cpu["new"], cpu["advantages"], cpu["mask"])
        cuda_loss, cuda_metrics = get_policy_loss(name)(cuda["old"], cuda["new"], cuda["advantages"], cuda["mask"])
        torch.testing.assert_close(cuda_loss.cpu(), cpu_loss, msg=name)
        for key, value in cpu_metrics.items():
            torch.testing.assert_close(cuda_metrics[key].cpu(), value, msg=f"{name} {key}")
    for kind in KL_ESTIMATORS:
        cpu_penalty = apply_kl_penalty(cpu["rewards"], cpu["new"], cpu["old"], cpu["mask"], 0.1, kind)
        cuda_penalty = apply_kl_penalty(cuda["rewards"], cuda["new"], cuda["old"], cuda["mask"], 0.1, kind)
        for on_cpu, on_cuda in zip(cpu_penalty, cuda_penalty, strict=True):
            torch.testing.assert_close(on_cuda.cpu(), on_cpu, msg=kind)
        torch.testing.assert_close(
            kl_loss(cuda["new"], cuda["old"], cuda["mask"], kind).cpu(),
            kl_loss(cpu["new"], cpu["old"], cpu["mask"], kind),
        )
    cpu_value, _ = value_loss(cpu["values"], cpu["old"], cpu["rewards"], cpu["mask"], 0.2)
    cuda_value, _ = value_loss(cuda["values"], cuda["old"], cuda["rewards"], cuda["mask"], 0.2)
    torch.testing.assert_close(cuda_value.cpu(), cpu_value)


def test_logits_utilities_match_cpu_on_cuda_in_bf16_with_gradients() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 64, 4096, generator=generator) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 4096, (3, 64), generator=generator)
    results = {}
    for device in ("cpu", "cuda"):
        leaf = logits.to(device).requires_grad_()
        logprobs = logprobs_from_logits(leaf, labels.to(device), chunk_size=37)
        entropy = entropy_from_logits_chunked(leaf, chunk_size=37)
        (logprobs.sum() + entropy.sum()).backward()
        assert leaf.grad is not None
        results[device] = (logprobs.cpu(), entropy.cpu(), entropy_from_logits(leaf.detach()).cpu(), leaf.grad.cpu())
    for on_cpu, on_cuda in zip(results["cpu"], results["cuda"], strict=True):
        torch.testing.assert_close(on_cuda.float(), on_cpu.float(), atol=1e-4, rtol=1e-3)
