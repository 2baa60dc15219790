"""Synthetic tasks: verl row format, exact prompt formats, determinism for a seed, disjoint train and test splits."""

import ast
import re

import pytest

from rlmesh.data.synthetic import TASKS, is_held_out, make_task, make_task_rows
from rlmesh.reward import default_compute_score
from rlmesh.reward.countdown import evaluate_equation

ARITHMETIC_VOCABULARY = set("0123456789+-*=")


def keys_of(rows):
    """The problem behind each row, independent of how the task keys it internally."""
    return {(row["prompt"][0]["content"], str(row["reward_model"]["ground_truth"])) for row in rows}


def value_of(expression: str) -> int:
    """The value of a generated expression, computed by Python's own grammar (parsed, never eval'd)."""
    value = evaluate_equation(expression, [int(number) for number in re.findall(r"\d+", expression)])
    assert value.denominator == 1
    return int(value)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_rows_have_verl_format(task):
    rows = make_task_rows(task, 20, seed=0, split="train")
    assert len(rows) == 20
    for index, row in enumerate(rows):
        assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
        assert row["data_source"] == task
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert row["prompt"][0]["content"]
        assert isinstance(row["ability"], str) and row["ability"]
        assert row["reward_model"]["style"] == "rule"
        assert row["extra_info"]["split"] == "train"
        assert row["extra_info"]["index"] == index


def test_arithmetic_bare_prompt_is_the_expression_and_equals_sign():
    rows = make_task_rows("arithmetic", 500, seed=1, split="train")
    for row in rows:
        content, answer = row["prompt"][0]["content"], row["reward_model"]["ground_truth"]
        assert re.fullmatch(r"\d{1,2}\+\d{1,2}=", content), content
        assert re.fullmatch(r"\d+", answer), answer
        assert int(answer) == value_of(content[:-1])
        assert set(content + answer) <= ARITHMETIC_VOCABULARY


def test_arithmetic_difficulty_sets_digits_operators_and_operands():
    rows = make_task_rows("arithmetic", 500, seed=2, split="train", digits=3, operators="+-*", num_operands=3)
    contents = [row["prompt"][0]["content"] for row in rows]
    operands = [int(number) for content in contents for number in re.findall(r"\d+", content)]
    assert max(operands) >= 100 and max(operands) < 1000
    assert {operator for content in contents for operator in re.findall(r"[+\-*]", content)} == {"+", "-", "*"}
    assert all(len(re.findall(r"\d+", content)) == 3 for content in contents)
    # '*' binds tighter: each answer equals the expression's value under the usual precedence.
    for row, content in zip(rows, contents, strict=True):
        assert int(row["reward_model"]["ground_truth"]) == value_of(content[:-1])
    assert any(row["reward_model"]["ground_truth"].startswith("-") for row in rows)


def test_arithmetic_without_subtraction_never_produces_a_minus_sign():
    rows = make_task_rows("arithmetic", 300, seed=3, split="train", digits=2, operators="+*", num_operands=3)
    assert not any("-" in row["prompt"][0]["content"] + row["reward_model"]["ground_truth"] for row in rows)


def test_arithmetic_instruction_style_for_chat_models():
    row = make_task_rows("arithmetic", 1, seed=0, split="train", prompt_style="instruction")[0]
    expression = row["extra_info"]["expression"]
    assert row["prompt"][0]["content"] == f'What is {expression}? Give the final answer after "####".'
    response = f"Adding gives {row['reward_model']['ground_truth']}.\n#### {row['reward_model']['ground_truth']}"
    assert default_compute_score("arithmetic", response, row["reward_model"]["ground_truth"])["score"] == 1.0


def test_countdown_problems_are_solvable_with_the_given_numbers():
    rows = make_task_rows("countdown", 200, seed=0, split="train", num_numbers=4, max_number=50, max_target=80)
    for row in rows:
        ground_truth = row["reward_model"]["ground_truth"]
        assert len(ground_truth["numbers"]) == 4
        assert all(1 <= number <= 50 for number in ground_truth["numbers"])
        assert 1 <= ground_truth["target"] <= 80
        assert f"equals {ground_truth['target']}" in row["prompt"][0]["content"]
        solution = row["extra_info"]["solution"]
        assert evaluate_equation(solution, ground_truth["numbers"]) == ground_truth["target"]
        response = f"<think>...</think><answer>{solution}</answer>"
        assert default_compute_score("countdown", response, ground_truth)["score"] == 1.0


def test_digit_sort_answer_is_the_sorted_digits():
    rows = make_task_rows("digit_sort", 100, seed=0, split="test", length=7)
    for row in rows:
        content = row["prompt"][0]["content"]
        assert re.fullmatch(r"\d{7}=", content)
        assert row["reward_model"]["ground_truth"] == "".join(sorted(content[:-1]))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_is_scored_by_the_builtin_reward_of_its_data_source(task):
    for row in make_task_rows(task, 30, seed=4, split="test"):
        ground_truth = row["reward_model"]["ground_truth"]
        right = f"<answer>{row['extra_info']['solution']}</answer>" if task == "countdown" else ground_truth
        assert default_compute_score(row["data_source"], right, ground_truth)["score"] == 1.0
        assert default_compute_score(row["data_source"], "wrong", ground_truth)["score"] == 0.0


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_same_rows_other_seed_other_rows(task):
    first = make_task_rows(task, 50, seed=7, split="train")
    assert make_task_rows(task, 50, seed=7, split="train") == first
    assert make_task_rows(task, 50, seed=8, split="train") != first


def test_determinism_does_not_depend_on_the_process():
    # Pinned, so a change of generator (or a salted hash in seeding) shows up as a failure.
    rows = make_task_rows("arithmetic", 3, seed=0, split="train")
    assert [row["prompt"][0]["content"] for row in rows] == ["71+93=", "43+92=", "5+56="]


@pytest.mark.parametrize(("task", "train_size"), [("arithmetic", 6000), ("countdown", 1000), ("digit_sort", 3000)])
def test_train_and_test_never_share_a_problem(task, train_size):
    test = keys_of(make_task_rows(task, 500, seed=0, split="test"))
    train = keys_of(make_task_rows(task, train_size, seed=0, split="train"))
    assert len(test) == 500
    assert not train & test
    # Training prompts made on the fly with other seeds stay out of the test set too.
    for seed in (1, 2, 3):
        assert not keys_of(make_task_rows(task, 500, seed=seed, split="train", unique=False)) & test


def test_held_out_fraction_partitions_the_whole_problem_space():
    expressions = [f"{a}+{b}" for a in range(100) for b in range(100)]
    held_out = [expression for expression in expressions if is_held_out("arithmetic", expression)]
    assert 0.17 < len(held_out) / len(expressions) < 0.23
    test_rows = make_task_rows("arithmetic", len(held_out), seed=0, split="test")
    assert {row["extra_info"]["expression"] for row in test_rows} == set(held_out)


def test_unique_rows_cannot_exceed_the_problem_space():
    # One-digit addition has 100 problems, about 20 of them held out.
    with pytest.raises(ValueError, match="distinct test problems"):
        make_task_rows("arithmetic", 50, seed=0, split="test", digits=1)
    rows = make_task_rows("arithmetic", 50, seed=0, split="test", digits=1, unique=False)
    assert len(rows) == 50 and len(keys_of(rows)) < 50


def test_start_index_offsets_the_indexes():
    rows = make_task_rows("digit_sort", 3, seed=0, split="train", start_index=100)
    assert [row["extra_info"]["index"] for row in rows] == [100, 101, 102]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: make_task("addition"), KeyError, "known: \\['arithmetic', 'countdown', 'digit_sort'\\]"),
        (lambda: make_task("arithmetic", digit=3), TypeError, "no setting\\(s\\) \\['digit'\\].*'digits': 2"),
        (lambda: make_task("arithmetic", operators="+/"), ValueError, "operators"),
        (lambda: make_task("arithmetic", prompt_style="chat"), ValueError, "prompt_style"),
        (lambda: make_task("countdown", num_numbers=9), ValueError, "num_numbers"),
        (lambda: make_task_rows("arithmetic", 5, seed=0, split="validation"), ValueError, "split"),
        (lambda: make_task_rows("arithmetic", 5, seed=0, held_out_fraction=0.0), ValueError, "held_out_fraction"),
    ],
)
def test_bad_arguments_say_what_is_wrong(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_generated_expressions_parse_as_python_would():
    # A guard on value_of itself: Python's grammar gives '*' precedence over '-'.
    assert isinstance(ast.parse("5-2*3", mode="eval").body, ast.BinOp)
    assert value_of("5-2*3") == -1
