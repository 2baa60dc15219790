"""GSM8K / MATH / DAPO conversion: answer extraction by hand, and the scripts end to end on local datasets."""

import runpy
import sys
from pathlib import Path

import datasets
import pytest

from rlmesh.data import PromptDataset
from rlmesh.data.prepare import (
    GSM8K_INSTRUCTION,
    MATH_INSTRUCTION,
    convert_rows,
    dapo_row,
    detect_math_format,
    gsm8k_final_answer,
    gsm8k_row,
    last_boxed_answer,
    math_row,
)

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"


def run_script(name, *args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    runpy.run_path(str(SCRIPTS / name), run_name="__main__")


# -------------------------------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    ("answer", "final"),
    [
        ("She pays 2*500 = <<2*500=1000>>1000.\n#### 1,000", "1000"),
        ("so -3\n#### -3", "-3"),
        ("half #### not this\n#### 2.5", "2.5"),
    ],
)
def test_gsm8k_final_answer(answer, final):
    assert gsm8k_final_answer(answer) == final


def test_gsm8k_answer_without_marker_is_an_error():
    with pytest.raises(ValueError, match="no '####' final-answer marker"):
        gsm8k_final_answer("the answer is 4")


def test_gsm8k_row_matches_verl():
    example = {"question": "Tom has 3 apples. How many?", "answer": "3 apples\n#### 3"}
    row = gsm8k_row(example, 5, "test")
    assert GSM8K_INSTRUCTION == 'Let\'s think step by step and output the final answer after "####".'
    assert row == {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": f"Tom has 3 apples. How many? {GSM8K_INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "3"},
        "extra_info": {"split": "test", "index": 5, "question": example["question"], "answer": example["answer"]},
    }


def test_prepare_gsm8k_script_end_to_end(tmp_path, monkeypatch, char_tokenizer):
    schema = {
        "train": [
            {"question": "a costs 1,200 and b 300. total?", "answer": "1200+300=1500\n#### 1,500"},
            {"question": "what is 2+2?", "answer": "#### 4"},
        ],
        "test": [{"question": "what is 3-1?", "answer": "#### 2"}],
    }
    datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in schema.items()}).save_to_disk(
        tmp_path / "gsm8k_hub_copy"
    )
    run_script(
        "prepare_gsm8k.py",
        "--source",
        tmp_path / "gsm8k_hub_copy",
        "--local_dir",
        tmp_path / "out",
        monkeypatch=monkeypatch,
    )
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["test.parquet", "train.parquet"]
    train = PromptDataset(tmp_path / "out" / "train.parquet", char_tokenizer, max_prompt_length=256, strict=True)
    assert [train[i]["ground_truth"] for i in range(2)] == ["1500", "4"]
    assert train[0]["data_source"] == "openai/gsm8k"
    assert train[0]["extra_info"]["index"] == 0 and train[0]["extra_info"]["split"] == "train"
    assert char_tokenizer.decode(train[1]["prompt_ids"]) == f"<user>what is 2+2? {GSM8K_INSTRUCTION}\nA:"
    test = PromptDataset(tmp_path / "out" / "test.parquet", char_tokenizer, max_prompt_length=256, strict=True)
    assert len(test) == 1 and test[0]["ground_truth"] == "2"


# --------------------------------------------------------------------------------------------------- MATH


@pytest.mark.parametrize(
    ("solution", "answer"),
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{1}, then finally \\boxed{x^{2}+1}", "x^{2}+1"),
        ("the answer is $\\fbox{7}$", "7"),
        ("hence $\\boxed 5$.", "5"),
        ("no box here", None),
        ("broken \\boxed{1 + {2}", None),
        ("\\boxedx is not a box", None),
    ],
)
def test_last_boxed_answer(solution, answer):
    assert last_boxed_answer(solution) == answer


def test_math_row_uses_the_boxed_answer_and_keeps_level_and_type():
    example = {"problem": "Compute 1/2.", "level": "Level 1", "type": "Algebra", "solution": "It is $\\boxed{0.5}$."}
    row = math_row(example, 3, "train")
    assert row is not None
    assert MATH_INSTRUCTION == "Let's think step by step and output the final answer within \\boxed{}."
    assert row["prompt"] == [{"role": "user", "content": f"Compute 1/2. {MATH_INSTRUCTION}"}]
    assert row["reward_model"] == {"style": "rule", "ground_truth": "0.5"}
    assert row["data_source"] == "DigitalLearningGmbH/MATH-lighteval"
    assert row["extra_info"] == {"split": "train", "index": 3, "level": "Level 1", "type": "Algebra"}


def test_math_row_prefers_an_answer_field_and_skips_unanswerable_rows():
    with_answer = math_row({"problem": "p", "solution": "\\boxed{1}", "answer": "2"}, 0, "test")
    assert with_answer is not None and with_answer["reward_model"]["ground_truth"] == "2"
    assert math_row({"problem": "p", "solution": "no answer"}, 0, "test") is None


def test_prepare_math_script_end_to_end(tmp_path, monkeypatch, char_tokenizer):
    lighteval_rows = [
        {"problem": "what is 1+1?", "level": "Level 1", "type": "Prealgebra", "solution": "$\\boxed{2}$"},
        {"problem": "what is 2*3?", "level": "Level 2", "type": "Prealgebra", "solution": "it is \\boxed{6}."},
        {"problem": "unanswered?", "level": "Level 5", "type": "Algebra", "solution": "we give up"},
    ]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(lighteval_rows)}).save_to_disk(tmp_path / "math")
    run_script(
        "prepare_math.py", "--source", tmp_path / "math", "--local_dir", tmp_path / "out", monkeypatch=monkeypatch
    )
    dataset = PromptDataset(tmp_path / "out" / "train.parquet", char_tokenizer, max_prompt_length=256, strict=True)
    assert [dataset[i]["ground_truth"] for i in range(len(dataset))] == ["2", "6"]
    assert MATH_INSTRUCTION in dataset[0]["raw_prompt"][0]["content"]


# --------------------------------------------------------------------------------------------------- DAPO


def dapo_example(problem: str, answer: str, uid: str):
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": f"Solve: {problem}\nAnswer: $Answer"}],
        "ability": "MATH",
        "reward_model": {"style": "rule-lighteval/MATH_v2", "ground_truth": answer},
        "extra_info": {"index": uid},
    }


def test_dapo_row_keeps_the_row_and_adds_the_split():
    row = dapo_row(dapo_example("1+1", "2", "abc"), 0, "train")
    assert row["prompt"] == dapo_example("1+1", "2", "abc")["prompt"]
    assert row["reward_model"] == {"style": "rule-lighteval/MATH_v2", "ground_truth": "2"}
    assert row["extra_info"] == {"index": "abc", "split": "train"}
    assert row["data_source"] == "math_dapo" and row["ability"] == "MATH"


def test_dapo_row_without_ground_truth_is_an_error():
    example = dapo_example("1+1", "2", "abc")
    example["reward_model"] = {"style": "rule"}
    with pytest.raises(ValueError, match=r"DAPO row 4 needs reward_model\.ground_truth"):
        dapo_row(example, 4, "train")


def test_convert_rows_dedupes_repeated_prompts():
    examples = [dapo_example("1+1", "2", "a"), dapo_example("2+2", "4", "b"), dapo_example("1+1", "2", "a")]
    rows, counts = convert_rows(examples, dapo_row, "train", dedupe_prompts=True)
    assert [row["reward_model"]["ground_truth"] for row in rows] == ["2", "4"]
    assert counts == {"input": 3, "output": 2, "no_answer": 0, "duplicates": 1}
    assert len(convert_rows(examples, dapo_row, "train")[0]) == 3


def test_detect_math_format():
    assert detect_math_format(["problem", "level", "type", "solution"]) == "math"
    assert detect_math_format(["data_source", "prompt", "ability", "reward_model", "extra_info"]) == "dapo"
    with pytest.raises(ValueError, match=r"\['question'\].*--format"):
        detect_math_format(["question"])


@pytest.mark.parametrize(("flags", "expected_rows"), [([], 2), (["--keep_duplicates"], 4)])
def test_prepare_math_script_on_dapo(flags, expected_rows, tmp_path, monkeypatch, char_tokenizer):
    # The hub copy repeats every prompt; here twice.
    examples = [dapo_example("1+1", "2", "a"), dapo_example("2+2", "4", "b")] * 2
    datasets.Dataset.from_list(examples).save_to_disk(tmp_path / "dapo")
    run_script(
        "prepare_math.py",
        "--source",
        tmp_path / "dapo",
        "--local_dir",
        tmp_path / "out",
        *flags,
        monkeypatch=monkeypatch,
    )
    dataset = PromptDataset(tmp_path / "out" / "train.parquet", char_tokenizer, max_prompt_length=256, strict=True)
    assert len(dataset) == expected_rows
    assert dataset[1]["ground_truth"] == "4" and dataset[1]["data_source"] == "math_dapo"
