"""Batch: fields, row indexing, concat/split/repeat/pad, devices, pickling and building from generations."""

import pickle

import numpy as np
import pytest
import torch

from rlmesh.data import Batch, response_tokens


def numbered_batch(size: int = 6, response_length: int = 4) -> Batch:
    """Row i holds the value i everywhere, so any reordering or loss of rows is visible in every field."""
    rows = torch.arange(size)
    return Batch(
        {
            "response_ids": rows[:, None].repeat(1, response_length),
            "advantages": rows[:, None].float().repeat(1, response_length),
            "attention_mask": torch.ones(size, response_length + 2, dtype=torch.long),
        },
        {"uid": [f"u{i}" for i in range(size)], "extra_info": [{"row": i} for i in range(size)]},
        {"step": 3},
    )


def row_ids(batch: Batch) -> list[int]:
    """Row identities read from a tensor and from a list; they must agree, or a field lost its alignment."""
    from_tensor = batch["response_ids"][:, 0].tolist()
    from_list = [int(uid[1:]) for uid in batch["uid"]]
    assert from_tensor == from_list
    return from_tensor


# ----------------------------------------------------------------------------------------- construction/fields


def test_len_and_field_access():
    batch = numbered_batch(5)
    assert len(batch) == 5
    assert batch["uid"][2] == "u2"
    assert batch["advantages"].shape == (5, 4)
    assert "uid" in batch and "advantages" in batch and "values" not in batch
    assert batch.keys() == ["response_ids", "advantages", "attention_mask", "uid", "extra_info"]
    assert batch.get("values") is None and batch.get("uid") == [f"u{i}" for i in range(5)]


def test_missing_field_error_lists_the_fields():
    with pytest.raises(KeyError, match=r"no field 'values'.*advantages"):
        numbered_batch()["values"]


def test_constructor_rejects_fields_of_different_lengths():
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        Batch({"a": torch.zeros(3, 2)}, {"uid": ["x", "y"]})


def test_constructor_rejects_a_scalar_tensor():
    with pytest.raises(ValueError, match="'temperature' must be a tensor with a leading sample dimension"):
        Batch({"temperature": torch.tensor(1.0)})


def test_constructor_rejects_a_name_given_twice():
    with pytest.raises(ValueError, match=r"\['uid'\] were given both"):
        Batch({"uid": torch.zeros(2)}, {"uid": ["a", "b"]})


def test_empty_batch_has_size_zero_or_the_given_size():
    assert len(Batch()) == 0
    assert len(Batch(size=4)) == 4


def test_new_fields_can_be_added_and_replaced():
    batch = numbered_batch(3)
    batch["returns"] = torch.ones(3, 4)
    batch["score"] = torch.tensor([1.0, 2.0, 3.0])
    batch["data_source"] = ["a", "b", "c"]
    batch["weights"] = np.array([0.5, 1.0, 2.0])  # numeric numpy becomes a tensor
    assert torch.equal(batch["returns"], torch.ones(3, 4))
    assert isinstance(batch["weights"], torch.Tensor)
    assert batch["data_source"] == ["a", "b", "c"]
    batch["uid"] = torch.arange(3)  # a field may change kind; the old one must not linger
    assert isinstance(batch["uid"], torch.Tensor)
    assert batch.keys().count("uid") == 1


def test_setting_a_field_with_the_wrong_number_of_rows_fails():
    batch = numbered_batch(3)
    with pytest.raises(ValueError, match="leading dimension of 3"):
        batch["returns"] = torch.ones(4, 4)
    with pytest.raises(ValueError, match="needs 3 values"):
        batch["data_source"] = ["a", "b"]


def test_a_per_token_field_must_match_the_response_width():
    batch = numbered_batch(3, response_length=4)
    with pytest.raises(ValueError, match=r"'old_logprobs' is per-token.*\[3, 4\]"):
        batch["old_logprobs"] = torch.zeros(3, 5)


def test_a_string_is_not_a_per_sample_field():
    with pytest.raises(TypeError, match=r"batch.meta\['data_source'\]"):
        numbered_batch()["data_source"] = "gsm8k"


def test_delete_field():
    batch = numbered_batch()
    del batch["uid"]
    del batch["advantages"]
    assert "uid" not in batch and "advantages" not in batch
    with pytest.raises(KeyError):
        del batch["uid"]


# ------------------------------------------------------------------------------------------------- indexing


def test_int_index_returns_a_batch_of_one_row():
    batch = numbered_batch(5)
    assert row_ids(batch[2]) == [2]
    assert row_ids(batch[-1]) == [4]
    assert batch[2].meta == {"step": 3}


@pytest.mark.parametrize("position", [5, -6])
def test_int_index_out_of_range_names_the_row(position):
    with pytest.raises(IndexError, match=f"row {position} is out of range for a Batch of 5 rows"):
        numbered_batch(5)[position]


def test_slices_including_steps_and_reversal():
    batch = numbered_batch(6)
    assert row_ids(batch[1:4]) == [1, 2, 3]
    assert row_ids(batch[::2]) == [0, 2, 4]
    assert row_ids(batch[::-1]) == [5, 4, 3, 2, 1, 0]
    assert len(batch[4:2]) == 0


@pytest.mark.parametrize(
    "index",
    [[4, 0, 4, 2], torch.tensor([4, 0, 4, 2]), np.array([4, 0, 4, 2]), [-2, 0, -2, 2]],
    ids=["list", "long_tensor", "numpy", "negative"],
)
def test_integer_lists_keep_their_order_and_repeats(index):
    assert row_ids(numbered_batch(6)[index]) == [4, 0, 4, 2]


def test_bool_mask_selects_rows():
    mask = torch.tensor([True, False, True, False, False, True])
    assert row_ids(numbered_batch(6)[mask]) == [0, 2, 5]


def test_empty_index_list_gives_an_empty_batch_with_the_same_fields():
    empty = numbered_batch(6)[[]]
    assert len(empty) == 0
    assert empty.keys() == numbered_batch(6).keys()
    assert empty["advantages"].shape == (0, 4)


def test_integer_list_out_of_range_names_the_rows():
    with pytest.raises(IndexError, match=r"rows \[6, -7\] are out of range"):
        numbered_batch(6)[[0, 6, -7]]


def test_float_indices_are_rejected():
    with pytest.raises(TypeError, match="must be integers"):
        numbered_batch(6)[torch.tensor([0.0, 1.0])]


def test_index_then_concat_round_trips_as_the_shard_dispatch_uses_it():
    """ActorMesh.shard pads with integer lists, splits with integer lists, gathers with concat and drops the pad."""
    batch = numbered_batch(7)
    padded = batch[[*range(7), 0]]
    shards = [padded[list(range(start, start + 2))] for start in range(0, 8, 2)]
    gathered = Batch.concat(shards)[:7]
    assert row_ids(gathered) == list(range(7))
    assert gathered["extra_info"] == batch["extra_info"]


# ---------------------------------------------------------------------------------------- select and concat


def test_select_keeps_only_the_named_fields_and_meta():
    selected = numbered_batch().select(["advantages", "uid"])
    assert selected.keys() == ["advantages", "uid"]
    assert selected.meta == {"step": 3}


def test_select_of_an_unknown_field_fails():
    with pytest.raises(KeyError, match=r"no fields \['values'\]"):
        numbered_batch().select(["uid", "values"])


def test_concat_stacks_rows_in_order_and_merges_meta():
    batch = numbered_batch(6)
    first, second = batch[:2], batch[2:]
    second.meta["rank"] = 1
    merged = Batch.concat([first, second])
    assert row_ids(merged) == list(range(6))
    assert merged.meta == {"step": 3, "rank": 1}


def test_concat_returns_new_tensors():
    batch = numbered_batch(3)
    merged = Batch.concat([batch])
    merged["advantages"][0, 0] = 99.0
    assert batch["advantages"][0, 0] == 0.0


def test_concat_of_different_fields_names_the_part():
    batch = numbered_batch(4)
    with pytest.raises(ValueError, match="part 1 has fields"):
        Batch.concat([batch[:2], batch[2:].select(["response_ids", "uid"])])


def test_concat_of_different_widths_names_the_field():
    short = Batch({"values": torch.zeros(2, 3)})
    long = Batch({"values": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match=r"'values' has per-sample shapes \[\(3,\), \(5,\)\]"):
        Batch.concat([short, long])


def test_concat_of_conflicting_meta_names_the_key():
    first, second = numbered_batch(2), numbered_batch(2)
    second.meta["step"] = 4
    with pytest.raises(ValueError, match=r"meta\['step'\] differs"):
        Batch.concat([first, second])


def test_concat_of_nothing_fails():
    with pytest.raises(ValueError, match="at least one Batch"):
        Batch.concat([])


# ------------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize(("size", "parts", "sizes"), [(6, 3, [2, 2, 2]), (7, 3, [3, 2, 2]), (2, 3, [1, 1, 0])])
def test_even_split_is_contiguous_and_in_order(size, parts, sizes):
    split = numbered_batch(size).split(parts)
    assert [len(part) for part in split] == sizes
    assert [row for part in split for row in row_ids(part)] == list(range(size))


def test_even_split_reports_token_counts():
    batch = numbered_batch(4)
    batch["attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1] * 6])
    split = batch.split(2)
    assert split.token_counts == [7, 8]


def test_split_without_attention_mask_has_no_token_report():
    split = numbered_batch(4).select(["uid"]).split(2)
    assert split.token_counts is None


def skewed_batch(lengths: list[int]) -> Batch:
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return Batch(
        {"attention_mask": mask, "response_ids": torch.arange(len(lengths))[:, None].repeat(1, width)},
        {"uid": [f"u{i}" for i in range(len(lengths))]},
    )


def test_balanced_split_evens_out_tokens_that_a_contiguous_split_would_not():
    # Sorted longest first, as a length-bucketed rollout returns them: contiguous chunks are badly skewed.
    lengths = [200 - 8 * i for i in range(24)]
    batch = skewed_batch(lengths)
    contiguous = batch.split(3)
    balanced = batch.split(3, balance_by_tokens=True)
    assert max(contiguous.token_counts or []) > 2 * min(contiguous.token_counts or [1])
    assert max(balanced.token_counts or []) < 1.02 * min(balanced.token_counts or [1])
    assert sorted(len(part) for part in balanced) == [8, 8, 8]
    assert sum(balanced.token_counts or []) == sum(lengths)
    for part, indices in zip(balanced, balanced.indices, strict=True):
        assert row_ids(part) == indices.tolist() == sorted(indices.tolist())


def test_balanced_split_gather_restores_the_original_order():
    batch = skewed_batch([5, 50, 3, 40, 7, 30, 2])
    split = batch.split(3, balance_by_tokens=True)
    results = []
    for part in split:
        result = part[:]
        result["doubled"] = part["response_ids"][:, 0] * 2  # what an actor adds
        results.append(result)
    gathered = split.gather(results)
    assert row_ids(gathered) == list(range(7))
    assert gathered["doubled"].tolist() == [2 * i for i in range(7)]


def test_gather_rejects_results_of_the_wrong_size():
    split = numbered_batch(6).split(2)
    with pytest.raises(ValueError, match="result 1 has 2 rows but its part had 3"):
        split.gather([split[0], split[1][:2]])


def test_balanced_split_needs_an_attention_mask():
    with pytest.raises(KeyError, match="attention_mask"):
        numbered_batch().select(["uid"]).split(2, balance_by_tokens=True)


def test_split_into_zero_parts_fails():
    with pytest.raises(ValueError, match="num_parts >= 1, got 0"):
        numbered_batch().split(0)


# ---------------------------------------------------------------------------------------- devices, pickling


def test_to_moves_every_tensor_and_keeps_the_rest():
    moved = numbered_batch(3).to("meta")
    assert {moved[key].device.type for key in ("response_ids", "advantages", "attention_mask")} == {"meta"}
    assert moved["uid"] == ["u0", "u1", "u2"]
    assert moved.meta == {"step": 3}


def test_pickle_round_trip_keeps_every_dtype_and_shape():
    tensors = {
        "bf16": torch.randn(3, 5).bfloat16(),
        "bool": torch.rand(3, 2) > 0.5,
        "int8": torch.randint(-5, 5, (3,), dtype=torch.int8),
        "non_contiguous": torch.randn(5, 3).t(),
        "empty": torch.zeros(3, 0),
        "cube": torch.randn(3, 2, 4, dtype=torch.float64),
    }
    batch = Batch(tensors, {"uid": ["a", "b", "c"]}, {"step": 7})
    restored = pickle.loads(pickle.dumps(batch))
    for key, tensor in tensors.items():
        assert restored[key].dtype == tensor.dtype, key
        assert torch.equal(restored[key], tensor), key
    assert restored["uid"] == ["a", "b", "c"] and restored.meta == {"step": 7}


def test_pickle_protocol_5_sends_tensor_bytes_out_of_band():
    """Ray's zero-copy path applies only to out-of-band buffers; in-band tensor bytes would be copied twice."""
    batch = Batch({"logprobs": torch.randn(64, 1024), "ids": torch.randint(0, 9, (64, 1024))})
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    tensor_bytes = 64 * 1024 * (4 + 8)
    assert sum(memoryview(buffer).nbytes for buffer in buffers) == tensor_bytes
    assert len(payload) < 4096
    restored = pickle.loads(payload, buffers=buffers)
    assert torch.equal(restored["logprobs"], batch["logprobs"])


def test_pickling_a_row_slice_sends_only_those_rows():
    """torch pickles a view with its whole storage; a shard of a big batch must not carry the rest of it."""
    batch = Batch({"logprobs": torch.randn(64, 1024)})
    buffers: list[pickle.PickleBuffer] = []
    pickle.dumps(batch[:2], protocol=5, buffer_callback=buffers.append)
    assert sum(memoryview(buffer).nbytes for buffer in buffers) == 2 * 1024 * 4


def test_iterating_a_batch_is_an_error():
    with pytest.raises(TypeError, match="not iterable"):
        list(numbered_batch())


def test_received_tensors_alias_the_received_buffer():
    """What 'zero-copy' means on the receiving side: the tensor is a view of the buffer, not a copy of it."""
    batch = Batch({"x": torch.arange(8.0)[:, None]})
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    raw = bytearray(memoryview(buffers[0]))
    restored = pickle.loads(payload, buffers=[raw])
    raw[:4] = np.float32(5.0).tobytes()
    assert restored["x"][0, 0] == 5.0


# --------------------------------------------------------------------------------------- from_generations


def test_from_generations_layout_matches_verl():
    batch = Batch.from_generations(
        prompt_ids=[[11, 12, 13], [21]],
        response_ids=[[14], [22, 23, 24]],
        rollout_logprobs=[[-0.5], [-0.1, -0.2, -0.3]],
        pad_token_id=0,
        non_tensors={"uid": ["p0", "p1"]},
        meta={"weight_version": 2},
    )
    assert batch["prompt_ids"].tolist() == [[11, 12, 13], [0, 0, 21]]
    assert batch["response_ids"].tolist() == [[14, 0, 0], [22, 23, 24]]
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 0, 0], [0, 0, 21, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    # Prompt: max(cumsum(mask) - 1, 0); response: last prompt position + 1..R, padding included.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]
    assert batch["rollout_logprobs"].dtype == torch.float32
    assert torch.allclose(batch["rollout_logprobs"], torch.tensor([[-0.5, 0, 0], [-0.1, -0.2, -0.3]]))
    assert batch["uid"] == ["p0", "p1"] and batch.meta == {"weight_version": 2}


def test_from_generations_with_fixed_widths_and_tensor_rows():
    batch = Batch.from_generations(
        [torch.tensor([5, 6])], [np.array([7])], pad_token_id=9, prompt_length=4, response_length=3
    )
    assert batch["input_ids"].tolist() == [[9, 9, 5, 6, 7, 9, 9]]
    assert batch["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3, 4]]
    assert "rollout_logprobs" not in batch


def test_from_generations_allows_an_empty_response():
    batch = Batch.from_generations([[1, 2]], [[]], [[]], pad_token_id=0)
    assert batch["response_ids"].shape == (1, 0)
    assert batch["attention_mask"].tolist() == [[1, 1]]


def test_from_generations_errors_name_the_sample():
    with pytest.raises(ValueError, match="sample 1 has 2 response tokens but 1 rollout logprobs"):
        Batch.from_generations([[1], [2]], [[3], [4, 5]], [[-1.0], [-1.0]], pad_token_id=0)
    with pytest.raises(ValueError, match="sample 1 has a response of 3 tokens, longer than response_length=2"):
        Batch.from_generations([[1], [2]], [[3], [4, 5, 6]], pad_token_id=0, response_length=2)
    with pytest.raises(ValueError, match=r"samples \[0\] have empty prompts"):
        Batch.from_generations([[]], [[1]], pad_token_id=0)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        Batch.from_generations([[1], [2]], [[3]], pad_token_id=0)


def test_a_multi_turn_mask_trains_only_sampled_tokens_while_attention_covers_the_whole_response():
    batch = Batch.from_generations(
        [[5, 6], [7]],
        [[1, 2, 3, 4], [8, 9]],
        [[-0.1, 0.0, 0.0, -0.4], [-0.8, -0.9]],
        pad_token_id=0,
        response_masks=[[1, 0, 0, 1], None],  # sample 0: two tool tokens between its turns; sample 1 all sampled
    )
    assert batch["response_mask"].tolist() == [[1, 0, 0, 1], [1, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]]
    assert response_tokens(batch).tolist() == [[True] * 4, [True, True, False, False]]
    with pytest.raises(ValueError, match="sample 0 has 4 response tokens but a response mask of 3"):
        Batch.from_generations([[5]], [[1, 2, 3, 4]], pad_token_id=0, response_masks=[[1, 0, 1]])
