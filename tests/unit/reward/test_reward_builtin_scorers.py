"""Built-in scorers on hand-picked responses: correct, incorrect and malformed, chosen by data_source."""

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmesh.reward import (
    BUILTIN_SCORERS,
    UnknownDataSourceError,
    countdown,
    default_compute_score,
    exact_match,
    gsm8k,
    math_answers,
)
from rlmesh.reward.countdown import InvalidEquation, evaluate_equation


def score_of(data_source, solution, ground_truth, **kwargs):
    scorer = BUILTIN_SCORERS[data_source]
    return scorer(data_source, solution, ground_truth, None, **kwargs)["score"]


# --- gsm8k -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solution", "strict", "flexible"),
    [
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", 1.0, 1.0),
        ("The answer is 72", 0.0, 1.0),  # no '####': only flexible finds it
        ("The answer is 72.", 0.0, 1.0),  # a closing period is not part of the number
        ("#### 71", 0.0, 0.0),
        ("#### 70\nWait, I made a mistake.\n#### 72", 1.0, 1.0),  # the last '####' counts
        ("#### 72\nand then 5 more apples", 1.0, 0.0),  # flexible takes the last number, 5
        ("####72", 0.0, 1.0),  # strict needs the space, as verl's regex does
        ("", 0.0, 0.0),
        ("no numbers at all", 0.0, 0.0),
    ],
)
def test_gsm8k_strict_and_flexible(solution, strict, flexible):
    assert score_of("openai/gsm8k", solution, "72") == strict
    assert score_of("openai/gsm8k", solution, "72", method="flexible") == flexible


def test_gsm8k_numbers_compare_by_value_without_commas():
    assert score_of("openai/gsm8k", "#### 1,000", "1000") == 1.0
    assert score_of("openai/gsm8k", "#### 18.00", "18") == 1.0
    assert score_of("openai/gsm8k", "#### -3", "-3") == 1.0
    assert score_of("openai/gsm8k", "#### 3", "-3") == 0.0


def test_gsm8k_reads_only_the_last_300_characters_like_verl():
    late_filler = " and that is all I have to say" * 12  # 360 characters without a digit
    assert score_of("openai/gsm8k", "#### 72" + late_filler, "72") == 0.0
    assert score_of("openai/gsm8k", "x" * 10_000 + "#### 72", "72") == 1.0


def test_gsm8k_format_score_for_a_wrong_number_only():
    assert score_of("openai/gsm8k", "#### 5", "72", format_score=0.1) == 0.1
    assert score_of("openai/gsm8k", "no answer", "72", format_score=0.1) == 0.0


def test_gsm8k_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="lenient"):
        gsm8k.extract_gsm8k_answer("#### 1", method="lenient")


# --- math (math-verify) --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solution", "ground_truth"),
    [
        ("So the probability is $\\boxed{\\frac{1}{2}}$.", "0.5"),
        ("So the probability is $\\boxed{0.5}$.", "\\frac{1}{2}"),
        ("The answer is \\boxed{\\frac{2}{4}}", "\\frac{1}{2}"),
        ("The answer is 1/2", "\\frac{1}{2}"),
        ("$\\boxed{\\frac{\\sqrt{2}}{2}}$", "\\frac{1}{\\sqrt{2}}"),
        ("$\\boxed{x^2 + 2x + 1}$", "(x+1)^2"),
        ("Answer: 42", "42"),
    ],
)
def test_math_accepts_equivalent_answers(solution, ground_truth):
    result = math_answers.compute_score("lighteval/MATH", solution, ground_truth)
    assert result["score"] == 1.0
    assert result["acc"] is True


@pytest.mark.parametrize(
    "solution",
    [
        "The answer is \\boxed{3}",
        "I do not know",
        "",
        "\\boxed{\\frac{1}{",
        "\\boxed{}",
        "}}}{{{\\boxed",
        # math-verify reads several boxed answers as a set, so hedging is not rewarded.
        "maybe \\boxed{\\frac{1}{2}} or \\boxed{3}",
    ],
)
def test_math_rejects_wrong_and_malformed_answers(solution):
    assert math_answers.compute_score("lighteval/MATH", solution, "\\frac{1}{2}")["score"] == 0.0


@pytest.mark.parametrize("data_source", ["DigitalLearningGmbH/MATH-lighteval", "math_dapo", "math", "aime2024"])
def test_math_data_sources_dispatch_to_math_verify(data_source):
    assert default_compute_score(data_source, "\\boxed{\\frac{1}{2}}", "0.5")["score"] == 1.0
    assert default_compute_score(data_source, "\\boxed{0.6}", "0.5")["score"] == 0.0


# --- arithmetic and digit_sort (exact match) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("68", 1.0),
        (" 68 \n", 1.0),
        ("68<|endoftext|>23+45=68", 1.0),  # the end marker ends the answer
        ("68</s>", 1.0),
        ("68\n12+3=15", 1.0),
        ("23 plus 45 is 68.\n#### 68", 1.0),  # instruction style
        ("#### 68.", 1.0),
        ("068", 0.0),
        ("6 8", 0.0),
        ("68+1", 0.0),
        ("69", 0.0),
        ("", 0.0),
        ("the answer is 68", 0.0),  # no '####' and not bare
    ],
)
def test_arithmetic_is_an_exact_match_of_the_answer(solution, expected):
    assert score_of("arithmetic", solution, "68") == expected


def test_arithmetic_negative_answer_and_digit_sort():
    assert score_of("arithmetic", "-12", "-12") == 1.0
    assert score_of("arithmetic", "12", "-12") == 0.0
    assert score_of("digit_sort", "01239", "01239") == 1.0
    assert score_of("digit_sort", "1239", "01239") == 0.0


def test_exact_match_extraction_reports_the_prediction():
    assert exact_match.extract_exact_answer("work... #### 68.\nmore") == "68"
    assert exact_match.compute_score("arithmetic", "67", "68")["pred"] == "67"


# --- countdown ---------------------------------------------------------------------------------------------------

NINE = {"target": 9, "numbers": [1, 2, 3]}


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("<think>1+2 is 3, times 3</think> <answer> (1 + 2) * 3 </answer>", 1.0),
        ("<answer>3*(2+1)</answer>", 1.0),
        ("<answer>(1+2)*3</answer>", 1.0),
        ("<answer>1+2</answer> no wait <answer>(1+2)*3</answer>", 1.0),  # the last answer counts
        ("<answer>(1+2)*3</answer> no wait <answer>1+2</answer>", 0.1),
        ("<answer>3*3</answer>", 0.1),  # 3 used twice
        ("<answer>9</answer>", 0.1),  # 9 is not given
        ("<answer>10-1</answer>", 0.1),
        ("<answer>(1+2)*3 = 9</answer>", 0.1),  # an equation, not an expression
        ("<answer>3**2</answer>", 0.1),  # power is not allowed
        ("<answer>(3+1+2)//2*3</answer>", 0.1),  # floor division is not allowed
        ("<answer>3.0*3</answer>", 0.1),
        ("<answer>__import__('os').system('true')</answer>", 0.1),
        ("<answer>abs(-9)</answer>", 0.1),
        ("<answer>1/(2-2)</answer>", 0.1),  # division by zero
        ("<answer>(1+2</answer>", 0.1),
        ("<answer></answer>", 0.1),
        ("(1+2)*3", 0.0),  # no answer tags
        ("<answer>(1+2)*3", 0.0),
    ],
)
def test_countdown(solution, expected):
    assert score_of("countdown", solution, NINE, format_score=0.1) == expected


def test_countdown_default_gives_nothing_for_format_alone():
    assert score_of("countdown", "<answer>3*3</answer>", NINE) == 0.0


def test_countdown_divides_exactly():
    # 7/3 and 2/3 are not representable in floating point; exact fractions sum to 3 exactly.
    assert score_of("countdown", "<answer>7/3+2/3</answer>", {"target": 3, "numbers": [7, 3, 2, 3]}) == 1.0
    assert score_of("countdown", "<answer>4*6/3</answer>", {"target": 8, "numbers": [4, 6, 3]}) == 1.0


def test_countdown_accepts_ground_truth_read_back_from_parquet():
    ground_truth = {"target": np.int64(9), "numbers": np.array([1, 2, 3])}
    assert score_of("countdown", "<answer>(1+2)*3</answer>", ground_truth) == 1.0


def test_countdown_bounds_huge_inputs():
    long_equation = "<answer>" + "1+" * 2_000 + "1</answer>"  # rejected by length before parsing
    huge_equation = "<answer>" + "1+" * 200_000 + "1</answer>"  # its opening tag is beyond the searched tail
    unclosed_tags = "<answer>" * 200_000
    deep_parentheses = "<answer>" + "(" * 100 + "1" + ")" * 100 + "</answer>"
    started = time.perf_counter()
    assert score_of("countdown", long_equation, NINE, format_score=0.1) == 0.1
    assert score_of("countdown", huge_equation, NINE, format_score=0.1) == 0.0
    assert score_of("countdown", unclosed_tags, NINE, format_score=0.1) == 0.0
    assert score_of("countdown", deep_parentheses, {"target": 1, "numbers": [1]}) == 1.0
    assert time.perf_counter() - started < 0.5
    with pytest.raises(InvalidEquation, match="more than"):
        evaluate_equation("1+" * 200 + "1", [1])


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/() .x_", max_size=300) | st.text(max_size=300))
def test_countdown_evaluator_only_ever_rejects_bad_text(text):
    try:
        value = evaluate_equation(text, [1, 2, 3, 4, 50])
    except InvalidEquation:
        return
    assert value.denominator >= 1  # a Fraction: exact arithmetic over the given numbers


# --- dispatch ----------------------------------------------------------------------------------------------------


def test_default_compute_score_dispatches_by_data_source():
    assert default_compute_score("openai/gsm8k", "#### 3", "3")["score"] == 1.0
    assert default_compute_score("countdown", "<answer>1+2</answer>", {"target": 3, "numbers": [1, 2]})["score"] == 1.0


def test_unknown_data_source_lists_the_known_ones():
    with pytest.raises(UnknownDataSourceError, match="my/dataset") as raised:
        default_compute_score("my/dataset", "42", "42")
    for known in ("openai/gsm8k", "arithmetic", "countdown", "digit_sort", "lighteval/MATH"):
        assert known in str(raised.value)


def test_every_builtin_scorer_returns_score_acc_pred():
    assert set(countdown.compute_score("countdown", "", NINE)) == {"score", "acc", "pred"}
    for data_source, scorer in BUILTIN_SCORERS.items():
        ground_truth = NINE if data_source == "countdown" else "9"
        result = scorer(data_source, "nothing", ground_truth)
        assert isinstance(result, dict)
        assert set(result) == {"score", "acc", "pred"}, data_source
