"""PromptLoader: seeded order, epochs, drop_last, and resuming mid-epoch from a state dict."""

import pytest

from rlmesh.data import PromptDataset, PromptLoader


def flatten(batches):
    return [row for batch in batches for row in batch]


def test_the_order_is_pinned_for_a_seed():
    # Pinned values: if numpy's generator stream ever changed, saved runs would resume in a different order.
    loader = PromptLoader(list(range(6)), batch_size=6, seed=0)
    assert loader.epoch_order(0).tolist() == [3, 2, 5, 4, 0, 1]
    assert loader.epoch_order(1).tolist() == [1, 4, 3, 0, 2, 5]


def test_same_seed_same_order_and_other_seed_other_order():
    rows = list(range(40))
    first = flatten(PromptLoader(rows, batch_size=8, seed=3))
    again = flatten(PromptLoader(rows, batch_size=8, seed=3))
    other = flatten(PromptLoader(rows, batch_size=8, seed=4))
    assert first == again
    assert first != other
    assert sorted(first) == rows and first != rows


def test_each_epoch_is_a_new_permutation_and_for_loops_advance_epochs():
    loader = PromptLoader(list(range(12)), batch_size=4, seed=0)
    epoch_0 = flatten(loader)
    epoch_1 = flatten(loader)
    assert loader.epoch == 1
    assert sorted(epoch_0) == sorted(epoch_1) == list(range(12))
    assert epoch_0 != epoch_1
    assert epoch_1 == loader.epoch_order(1).tolist()


def test_without_shuffle_the_order_is_the_dataset_order():
    assert flatten(PromptLoader(list(range(6)), batch_size=2, shuffle=False)) == list(range(6))


def test_drop_last_and_keep_last():
    dropped = list(PromptLoader(list(range(10)), batch_size=4, seed=1))
    kept = list(PromptLoader(list(range(10)), batch_size=4, seed=1, drop_last=False))
    assert [len(batch) for batch in dropped] == [4, 4]
    assert [len(batch) for batch in kept] == [4, 4, 2]
    assert len(PromptLoader(list(range(10)), batch_size=4)) == 2
    assert sorted(flatten(kept)) == list(range(10))


def test_next_batch_rolls_over_epochs():
    loader = PromptLoader(list(range(6)), batch_size=3, seed=2)
    batches = [loader.next_batch() for _ in range(5)]
    assert flatten(batches[:2]) == loader.epoch_order(0).tolist()
    assert flatten(batches[2:4]) == loader.epoch_order(1).tolist()
    assert batches[4] == loader.epoch_order(2).tolist()[:3]
    assert loader.state_dict()["epoch"] == 2


@pytest.mark.parametrize("saved_after", [1, 3, 4, 6])
def test_resume_continues_with_the_same_batches(saved_after):
    rows = list(range(13))
    reference = PromptLoader(rows, batch_size=4, seed=7)
    expected = [reference.next_batch() for _ in range(9)]

    interrupted = PromptLoader(rows, batch_size=4, seed=7)
    for _ in range(saved_after):
        interrupted.next_batch()
    state = interrupted.state_dict()

    resumed = PromptLoader(rows, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(9 - saved_after)] == expected[saved_after:]


def test_resume_after_breaking_out_of_a_for_loop_mid_epoch():
    rows = list(range(20))
    reference = PromptLoader(rows, batch_size=4, seed=5)
    expected = flatten(reference) + flatten(reference)

    interrupted = PromptLoader(rows, batch_size=4, seed=5)
    seen = []
    for batch in interrupted:
        seen.extend(batch)
        if len(seen) == 8:
            break
    resumed = PromptLoader(rows, batch_size=4, seed=5)
    resumed.load_state_dict(interrupted.state_dict())
    assert seen + flatten(resumed) + flatten(resumed) == expected


def test_state_from_different_settings_is_rejected():
    state = PromptLoader(list(range(10)), batch_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"seed: saved 1, now 2.*different order"):
        PromptLoader(list(range(10)), batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_rows: saved 10, now 11"):
        PromptLoader(list(range(11)), batch_size=2, seed=1).load_state_dict(state)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="batch_size=8 is larger than the dataset"):
        PromptLoader(list(range(5)), batch_size=8)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        PromptLoader(list(range(5)), batch_size=1, seed=-1)


def test_loader_over_a_prompt_dataset(make_row, char_tokenizer):
    rows = [make_row(f"what is {i}+1?", str(i + 1)) for i in range(6)]
    dataset = PromptDataset.from_rows(rows, char_tokenizer, max_prompt_length=64)
    batch = PromptLoader(dataset, batch_size=3, seed=0).next_batch()
    # seed 0, epoch 0 over 6 rows visits [3, 2, 5, ...] first (pinned above)
    assert [row["ground_truth"] for row in batch] == ["4", "3", "6"]
    assert all(row["prompt_ids"] for row in batch)
