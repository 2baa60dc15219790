"""PromptDataset: reading each source format, chat templating, overlong policies and malformed rows."""

import json
import logging

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlmesh.data import PromptDataset


@pytest.fixture
def rows(make_row):
    return [
        make_row("what is 1+2?", "3", index=0),
        make_row("what is 10*10?", "100", data_source="other", index=1),
        make_row("what is 7-5?", "2", index=2),
    ]


def write_parquet(rows, path):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(rows, path):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def expected_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------- reading


def test_parquet_rows_are_templated_and_tokenized(rows, char_tokenizer, tmp_path):
    dataset = PromptDataset(write_parquet(rows, tmp_path / "train.parquet"), char_tokenizer, max_prompt_length=64)
    assert len(dataset) == 3
    first = dataset[0]
    # The template's role tag and generation prompt must be in the ids, without added special tokens.
    assert char_tokenizer.decode(first["prompt_ids"]) == "<user>what is 1+2?\nA:"
    assert first["prompt_ids"] == expected_ids(char_tokenizer, rows[0]["prompt"])
    assert first["raw_prompt"] == rows[0]["prompt"]
    assert first["data_source"] == "arith" and dataset[1]["data_source"] == "other"
    assert first["ground_truth"] == "3" and first["ability"] == "math"
    assert first["extra_info"] == {"split": "train", "index": 0}
    assert [dataset[i]["index"] for i in range(3)] == [0, 1, 2]
    assert dataset[-1]["ground_truth"] == "2"


def test_jsonl_gives_the_same_rows_as_parquet(rows, char_tokenizer, tmp_path):
    from_parquet = PromptDataset(write_parquet(rows, tmp_path / "a.parquet"), char_tokenizer, max_prompt_length=64)
    from_jsonl = PromptDataset(write_jsonl(rows, tmp_path / "a.jsonl"), char_tokenizer, max_prompt_length=64)
    assert [from_jsonl[i] for i in range(3)] == [from_parquet[i] for i in range(3)]


def test_jsonl_keeps_each_rows_own_types(make_row, char_tokenizer, tmp_path):
    # A ground truth that is a string in one row and a number in another must not be coerced to one type.
    path = write_jsonl([make_row("a?", "1"), make_row("b?", 2)], tmp_path / "mixed.jsonl")
    dataset = PromptDataset(path, char_tokenizer, max_prompt_length=64)
    assert [dataset[0]["ground_truth"], dataset[1]["ground_truth"]] == ["1", 2]


def test_json_list_file(rows, char_tokenizer, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=2))
    assert len(PromptDataset(path, char_tokenizer, max_prompt_length=64)) == 3


def test_dataset_saved_to_disk_picks_the_split(rows, char_tokenizer, tmp_path):
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(tmp_path / "dict")
    assert len(PromptDataset(tmp_path / "dict", char_tokenizer, max_prompt_length=64)) == 3
    assert len(PromptDataset(tmp_path / "dict", char_tokenizer, max_prompt_length=64, split="test")) == 1
    with pytest.raises(KeyError, match=r"splits \['train', 'test'\], not 'valid'"):
        PromptDataset(tmp_path / "dict", char_tokenizer, max_prompt_length=64, split="valid")
    datasets.Dataset.from_list(rows[:2]).save_to_disk(tmp_path / "single")
    assert len(PromptDataset(str(tmp_path / "single"), char_tokenizer, max_prompt_length=64)) == 2


def test_several_sources_are_read_in_order_with_global_indices(rows, char_tokenizer, tmp_path):
    directory = tmp_path / "shards"
    directory.mkdir()
    write_parquet(rows[:1], directory / "part-0.parquet")
    write_parquet(rows[1:], directory / "part-1.parquet")
    jsonl = write_jsonl(rows[:1], tmp_path / "extra.jsonl")
    dataset = PromptDataset([directory, jsonl], char_tokenizer, max_prompt_length=64)
    assert [dataset[i]["ground_truth"] for i in range(4)] == ["3", "100", "2", "3"]
    assert [dataset[i]["index"] for i in range(4)] == [0, 1, 2, 3]


def test_from_rows_accepts_a_datasets_dataset(rows, char_tokenizer):
    dataset = PromptDataset.from_rows(datasets.Dataset.from_list(rows), char_tokenizer, max_prompt_length=64)
    assert dataset[2]["ground_truth"] == "2"


def test_unknown_suffix_missing_file_and_bad_directory(rows, char_tokenizer, tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unknown suffix '\.csv'"):
        PromptDataset(csv, char_tokenizer, max_prompt_length=64)
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet"):
        PromptDataset(tmp_path / "missing.parquet", char_tokenizer, max_prompt_length=64)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="neither a dataset saved by"):
        PromptDataset(tmp_path / "empty_dir", char_tokenizer, max_prompt_length=64)


def test_a_file_without_rows_is_an_error(char_tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl' has no rows"):
        PromptDataset(empty, char_tokenizer, max_prompt_length=64)


def test_position_out_of_range(rows, char_tokenizer):
    dataset = PromptDataset.from_rows(rows, char_tokenizer, max_prompt_length=64)
    with pytest.raises(IndexError, match="position 3 is out of range"):
        dataset[3]


# ------------------------------------------------------------------------------------------------ templating


def test_without_chat_template_the_contents_are_joined(make_row, char_tokenizer):
    row = make_row("ignored", "1")
    row["prompt"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"}]
    dataset = PromptDataset.from_rows([row], char_tokenizer, max_prompt_length=64, apply_chat_template=False)
    assert char_tokenizer.decode(dataset[0]["prompt_ids"]) == "be brief\nwhat is 2+2?"


def test_chat_template_kwargs_reach_the_template(rows, char_tokenizer):
    dataset = PromptDataset.from_rows(
        rows, char_tokenizer, max_prompt_length=64, chat_template_kwargs={"add_generation_prompt": False}
    )
    assert char_tokenizer.decode(dataset[0]["prompt_ids"]) == "<user>what is 1+2?\n"


def test_a_tokenizer_without_chat_template_is_an_error(rows, make_tokenizer):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"has no chat_template.*apply_chat_template=False"):
        PromptDataset.from_rows(rows, tokenizer, max_prompt_length=64)


def test_a_conversation_the_template_rejects_costs_only_its_row(rows, make_tokenizer):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('role bad is not allowed') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    rows[1]["prompt"][0]["role"] = "bad"
    dataset = PromptDataset.from_rows(rows, tokenizer, max_prompt_length=64)
    assert [dataset[i]["index"] for i in range(len(dataset))] == [0, 2]
    assert dataset.malformed_rows[0][0] == 1
    assert "role bad is not allowed" in dataset.malformed_rows[0][1]


# -------------------------------------------------------------------------------------------------- overlong


@pytest.fixture
def long_rows(make_row):
    # Rendered lengths: "<user>" (6) + question + "\n" (1) + "A:" (2) = 9 + len(question).
    return [make_row("ab", "1"), make_row("abcdefghijkl", "2"), make_row("abc", "3")]


def test_overlong_filter_drops_and_counts(long_rows, char_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="rlmesh.data.dataset"):
        dataset = PromptDataset.from_rows(long_rows, char_tokenizer, max_prompt_length=12, overlong="filter")
    assert [dataset[i]["index"] for i in range(len(dataset))] == [0, 2]
    assert dataset.num_filtered == 1 and dataset.overlong_rows == [(1, 21)]
    assert "filtered 1 prompts longer than max_prompt_length=12 (rows [1])" in caplog.text


@pytest.mark.parametrize("policy", ["truncate_left", "truncate_right"])
def test_overlong_truncation_keeps_the_chosen_end(policy, long_rows, char_tokenizer):
    dataset = PromptDataset.from_rows(long_rows, char_tokenizer, max_prompt_length=12, overlong=policy)
    full = expected_ids(char_tokenizer, long_rows[1]["prompt"])
    kept = dataset[1]["prompt_ids"]
    assert kept == (full[-12:] if policy == "truncate_left" else full[:12])
    assert dataset[0]["prompt_ids"] == expected_ids(char_tokenizer, long_rows[0]["prompt"])
    assert len(dataset) == 3 and dataset.num_filtered == 0 and dataset.overlong_rows == [(1, 21)]


def test_overlong_error_names_the_row(long_rows, char_tokenizer):
    with pytest.raises(ValueError, match=r"row 1 of in-memory rows has a prompt of 21 tokens.*max_prompt_length=12"):
        PromptDataset.from_rows(long_rows, char_tokenizer, max_prompt_length=12)


def test_unknown_overlong_policy_is_an_error(rows, char_tokenizer):
    with pytest.raises(ValueError, match="overlong='middle' is not a policy"):
        PromptDataset.from_rows(rows, char_tokenizer, max_prompt_length=12, overlong="middle")  # type: ignore[arg-type]


def test_every_row_filtered_is_an_error(long_rows, char_tokenizer):
    with pytest.raises(ValueError, match="no usable rows: 3 rows, 0 malformed, 3 longer than max_prompt_length=5"):
        PromptDataset.from_rows(long_rows, char_tokenizer, max_prompt_length=5, overlong="filter")


# ------------------------------------------------------------------------------------------------- malformed


def malformed_rows(make_row):
    good = make_row("what is 1+1?", "2")
    no_prompt = make_row("x", "1")
    del no_prompt["prompt"]
    numeric_source = {**make_row("x", "1"), "data_source": 7}
    empty_prompt = {**make_row("x", "1"), "prompt": []}
    blank_prompt = {**make_row("x", "1"), "prompt": [{"role": "user", "content": "  "}]}
    no_ground_truth = {**make_row("x", "1"), "reward_model": {"style": "rule"}}
    string_extra = {**make_row("x", "1"), "extra_info": "oops"}
    message_not_object = {**make_row("x", "1"), "prompt": ["hello"]}
    not_a_row = ["just", "a", "list"]
    return [
        good,
        no_prompt,
        numeric_source,
        empty_prompt,
        blank_prompt,
        no_ground_truth,
        string_extra,
        message_not_object,
        not_a_row,
        good,
    ]


def test_malformed_rows_are_skipped_reported_and_counted(make_row, char_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="rlmesh.data.dataset"):
        dataset = PromptDataset.from_rows(malformed_rows(make_row), char_tokenizer, max_prompt_length=64)
    assert [dataset[i]["index"] for i in range(len(dataset))] == [0, 9]
    reasons = dict(dataset.malformed_rows)
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7, 8] and dataset.num_malformed == 8
    assert reasons[1] == "missing field(s) ['prompt']"
    assert "data_source must be a non-empty string, got 7" in reasons[2]
    assert reasons[3] == "empty prompt (no messages)"
    assert reasons[4] == "empty prompt (every message content is blank)"
    assert reasons[5] == "missing field reward_model.ground_truth"
    assert "extra_info must be an object, got str" in reasons[6]
    assert "prompt message 0 must be an object" in reasons[7]
    assert "got list" in reasons[8]
    assert "skipping malformed row 3 of in-memory rows: empty prompt (no messages)" in caplog.text
    assert "skipped 8 malformed rows of 10" in caplog.text


def test_malformed_row_raises_under_strict(make_row, char_tokenizer):
    with pytest.raises(ValueError, match=r"row 1 of in-memory rows is malformed: missing field\(s\) \['prompt'\]"):
        PromptDataset.from_rows(malformed_rows(make_row), char_tokenizer, max_prompt_length=64, strict=True)


def test_unreadable_jsonl_line_is_a_malformed_row(rows, char_tokenizer, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n{not json\n" + json.dumps(rows[1]) + "\n")
    dataset = PromptDataset(path, char_tokenizer, max_prompt_length=64)
    assert len(dataset) == 2
    assert dataset.malformed_rows[0][0] == 1 and "line 2 is not valid JSON" in dataset.malformed_rows[0][1]


def test_no_usable_rows_is_an_error(make_row, char_tokenizer, tmp_path):
    path = write_jsonl(malformed_rows(make_row)[1:-1], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"bad\.jsonl has no usable rows: 8 rows, 8 malformed"):
        PromptDataset(path, char_tokenizer, max_prompt_length=64)
