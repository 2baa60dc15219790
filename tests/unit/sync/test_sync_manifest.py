"""SyncPlan: Hugging Face names, tied embeddings, bucket layout and offsets, JSON round trip, sender checks."""

from __future__ import annotations

import pytest
import torch

from rlmesh.sync.buckets import pack, slot_view, unpack
from rlmesh.sync.manifest import ALIGN_BYTES, PlanMismatchError, SyncPlan, hf_name, tensor_specs


def specs_of(**shapes: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(name.replace("__", "."), "float32", shape) for name, shape in shapes.items()]


def test_wrapper_components_are_stripped_anywhere_and_ddp_module_only_in_front():
    assert hf_name("module.model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert hf_name("module.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_name("_orig_mod.model.norm.weight") == "model.norm.weight"
    assert hf_name("_orig_mod.model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert hf_name("model.layers.0._fsdp_wrapped_module.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_name("model.layers.1._checkpoint_wrapped_module.self_attn.q_proj.bias") == (
        "model.layers.1.self_attn.q_proj.bias"
    )
    assert hf_name("model.layers.1._checkpoint_wrapped_module.mlp.weight") == "model.layers.1.mlp.weight"
    assert hf_name("lm_head.weight") == "lm_head.weight"
    # DDP over a compiled model and a compiled DDP model, and DDP twice: every wrapper in front goes.
    assert hf_name("module._orig_mod.model.norm.weight") == "model.norm.weight"
    assert hf_name("_orig_mod.module.model.norm.weight") == "model.norm.weight"
    assert hf_name("module.module.lm_head.weight") == "lm_head.weight"
    # A submodule really named 'module' inside the model is part of the Hugging Face name.
    assert hf_name("model.layers.0.adapter.module.weight") == "model.layers.0.adapter.module.weight"
    assert hf_name("module.vision.module.proj.weight") == "vision.module.proj.weight"


def test_tensors_fill_buckets_in_order_at_aligned_offsets():
    specs = [("a", "float32", (10,)), ("b", "float32", (3, 5)), ("c", "bfloat16", (7,)), ("d", "float32", (100,))]
    plan = SyncPlan.build(specs, bucket_bytes=256)
    slots = {s.name: s for s in plan.slots}
    assert [s.name for s in plan.slots] == ["a", "b", "c", "d"]
    assert (slots["a"].bucket, slots["a"].offset) == (0, 0)
    assert (slots["b"].bucket, slots["b"].offset) == (0, ALIGN_BYTES)  # 40 bytes rounded up to 64
    assert (slots["c"].bucket, slots["c"].offset) == (0, 128)
    assert slots["c"].nbytes == 14
    # d (400 bytes) does not fit after c, and is larger than a bucket: it gets a bucket of its own, sized to it
    assert (slots["d"].bucket, slots["d"].offset) == (1, 0)
    assert plan.bucket_sizes == (142, 400)
    assert plan.total_bytes == 542 and plan.num_buckets == 2 and plan.max_bucket_size == 400
    for slot in plan.slots:
        assert slot.offset % ALIGN_BYTES == 0
        assert slot.offset + slot.nbytes <= plan.bucket_sizes[slot.bucket]


def test_a_thousand_small_tensors_pack_into_few_buckets():
    specs = [(f"t{i}", "float32", (256,)) for i in range(1000)]
    plan = SyncPlan.build(specs, bucket_bytes=1 << 20)
    assert plan.num_buckets == 1 and plan.total_bytes == 1000 * 1024


def test_tied_lm_head_is_not_sent_and_wrapper_names_map_to_hf():
    specs = [
        ("module.model.embed_tokens.weight", "float32", (17, 8)),
        ("module.model.norm.weight", "float32", (8,)),
        ("module.lm_head.weight", "float32", (17, 8)),
    ]
    tied = SyncPlan.build(specs, bucket_bytes=1024, tie_word_embeddings=True)
    assert [s.name for s in tied.slots] == ["model.embed_tokens.weight", "model.norm.weight"]
    assert tied.skipped == ("module.lm_head.weight",)
    untied = SyncPlan.build(specs, bucket_bytes=1024, tie_word_embeddings=False)
    assert [s.name for s in untied.slots][-1] == "lm_head.weight" and untied.skipped == ()
    with pytest.raises(ValueError, match="ties its embeddings"):
        SyncPlan.build([("lm_head.weight", "float32", (4, 4))], bucket_bytes=1024, tie_word_embeddings=True)


def test_wire_dtype_casts_floating_tensors_only():
    specs = [("w", "float32", (4,)), ("steps", "int64", (1,))]
    plan = SyncPlan.build(specs, bucket_bytes=1024, wire_dtype=torch.bfloat16)
    assert [(s.wire_dtype, s.nbytes) for s in plan.slots] == [("bfloat16", 8), ("int64", 8)]


def test_plan_round_trips_through_json_with_the_same_fingerprint():
    plan = SyncPlan.build(specs_of(a=(3, 4), b=(5,)), bucket_bytes=64, transport="nccl", wire_dtype="bfloat16")
    again = SyncPlan.from_json(plan.to_json())
    assert again == plan and again.fingerprint == plan.fingerprint
    other = SyncPlan.build(specs_of(a=(3, 4), b=(6,)), bucket_bytes=64, transport="nccl", wire_dtype="bfloat16")
    assert other.fingerprint != plan.fingerprint


def test_bad_inputs_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="transport 'tcp'"):
        SyncPlan.build(specs_of(a=(1,)), bucket_bytes=1024, transport="tcp")
    with pytest.raises(ValueError, match="same Hugging Face name"):
        SyncPlan.build([("module.a", "float32", (1,)), ("a", "float32", (1,))], bucket_bytes=1024)
    with pytest.raises(ValueError, match="unknown dtype 'float33'"):
        SyncPlan.build([("a", "float33", (1,))], bucket_bytes=1024)


def test_sender_tensors_are_checked_against_the_plan():
    model = torch.nn.Linear(4, 3)
    plan = SyncPlan.build(tensor_specs(model.named_parameters()), bucket_bytes=1024)
    assert plan.check_tensor(0, "weight", model.weight).name == "weight"
    with pytest.raises(PlanMismatchError, match="order they were planned"):
        plan.check_tensor(0, "bias", model.bias)
    with pytest.raises(PlanMismatchError, match=r"float32\[3, 5\], the plan expects float32\[3, 4\]"):
        plan.check_tensor(0, "weight", torch.zeros(3, 5))
    with pytest.raises(PlanMismatchError, match="more tensors than the plan"):
        plan.check_tensor(2, "extra", torch.zeros(1))


def test_pack_then_unpack_gives_the_tensors_back_with_casts():
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2, 2, 2)}
    specs = [(name, str(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    plan = SyncPlan.build(specs, bucket_bytes=4096, wire_dtype="bfloat16")
    buffer = torch.zeros(plan.max_bucket_size, dtype=torch.uint8)
    for slot in plan.bucket(0):
        pack(buffer, slot, tensors[slot.source_name])
    views = dict(unpack(buffer, plan.bucket(0)))
    assert views["a"].dtype == torch.bfloat16 and views["b"].dtype == torch.int64
    torch.testing.assert_close(views["a"].float(), tensors["a"].bfloat16().float())
    assert torch.equal(views["b"], tensors["b"])
    assert views["c"].shape == (2, 2, 2)
    assert slot_view(buffer, plan.slots[1]).data_ptr() == buffer.data_ptr() + plan.slots[1].offset  # views, no copy
