"""scripts/make_synthetic_data.py writes train/test parquet files in verl's schema, readable back with pyarrow."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "make_synthetic_data.py"
PROMPT_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def load_script():
    spec = importlib.util.spec_from_file_location("make_synthetic_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_verl_schema(table: pa.Table) -> None:
    schema = table.schema
    assert schema.names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert schema.field("data_source").type == pa.string()
    assert schema.field("prompt").type == PROMPT_TYPE
    assert schema.field("ability").type == pa.string()
    reward_model = schema.field("reward_model").type
    assert [reward_model.field(i).name for i in range(reward_model.num_fields)] == ["style", "ground_truth"]
    extra_info = schema.field("extra_info").type
    assert {"split", "index"} <= {extra_info.field(i).name for i in range(extra_info.num_fields)}


def test_arithmetic_parquet_has_the_verl_schema(tmp_path):
    out_dir = load_script().main(
        ["--task", "arithmetic", "--train_size", "64", "--test_size", "16", "--seed", "3", "--out_dir", str(tmp_path)]
    )
    train, test = pq.read_table(out_dir / "train.parquet"), pq.read_table(out_dir / "test.parquet")
    for table, split, size in ((train, "train", 64), (test, "test", 16)):
        check_verl_schema(table)
        assert table.num_rows == size
        assert table.schema.field("reward_model").type.field("ground_truth").type == pa.string()
        rows = table.to_pylist()
        assert {row["extra_info"]["split"] for row in rows} == {split}
        assert all(row["data_source"] == "arithmetic" for row in rows)
        assert all(row["prompt"][0]["content"].endswith("=") for row in rows)
    prompts = {row["prompt"][0]["content"] for row in train.to_pylist()}
    assert not prompts & {row["prompt"][0]["content"] for row in test.to_pylist()}


def test_countdown_ground_truth_is_a_struct_of_target_and_numbers(tmp_path):
    load_script().main(["--task", "countdown", "--train_size", "8", "--test_size", "4", "--out_dir", str(tmp_path)])
    table = pq.read_table(tmp_path / "train.parquet")
    check_verl_schema(table)
    ground_truth_type = table.schema.field("reward_model").type.field("ground_truth").type
    assert ground_truth_type == pa.struct([("target", pa.int64()), ("numbers", pa.list_(pa.int64()))])


def test_difficulty_flags_reach_the_task_and_wrong_ones_are_refused(tmp_path):
    script = load_script()
    script.main(
        ["--task", "digit_sort", "--length", "9", "--train_size", "4", "--test_size", "2", "--out_dir", str(tmp_path)]
    )
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert all(len(row["prompt"][0]["content"]) == 10 for row in rows)
    with pytest.raises(TypeError, match="no setting"):
        script.main(["--task", "digit_sort", "--digits", "3", "--out_dir", str(tmp_path)])


def test_runs_as_a_script(tmp_path):
    command = [sys.executable, str(SCRIPT), "--task", "arithmetic", "--digits", "1", "--train_size", "10"]
    completed = subprocess.run(
        [*command, "--test_size", "5", "--out_dir", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert "wrote 10 train rows" in completed.stdout
    assert pq.read_table(tmp_path / "test.parquet").num_rows == 5
