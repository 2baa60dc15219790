"""The calculator environment: a safe integer evaluator, and answers scored by their last integer."""

from __future__ import annotations

import pytest

from rlmesh.envs.calculator import CalculatorArithmetic, evaluate_integer_expression


@pytest.mark.parametrize(
    ("expression", "value"), [("123*45", 5535), (" -(7 - 10) * 2 ", 6), ("17 // 5 + 17 % 5", 5), ("2*3*4", 24)]
)
def test_integer_expressions_evaluate(expression: str, value: int):
    assert evaluate_integer_expression(expression) == value


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("__import__('os').system('true')", "only integers"),
        ("2**10", "only integers"),  # no power: 10**10**10 would hang
        ("1.5*2", "only integers"),
        ("x*2", "only integers"),
        ("9" * 40 + "*" + "9" * 40, "more than 60 digits"),
        ("1" * 201, "longer than 200"),
    ],
)
def test_anything_else_is_refused_without_being_run(expression: str, why: str):
    with pytest.raises(ValueError, match=why):
        evaluate_integer_expression(expression)
    with pytest.raises(SyntaxError):
        evaluate_integer_expression("1 +")


def test_the_answer_is_the_last_integer_of_the_turn():
    env = CalculatorArithmetic()
    assert env.reset({"ground_truth": 5535, "prompt": []}) is None
    assert env.step("123*45 is 5535").reward == 1.0
    assert env.step("5535, no, 5536").reward == 0.0
    assert env.step("no idea").reward == 0.0 and env.step("no idea").done
    assert env.calculate("123*45") == "5535"
