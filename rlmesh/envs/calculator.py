"""Arithmetic with a calculator tool: a task where a tool really helps a small model (multi-digit products)."""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from rlmesh.envs.protocol import StepResult

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_DIGITS = 60  # a result beyond this is refused: 10**10**10 must not hang the tool
_LAST_INTEGER = re.compile(r"-?\d+")


def evaluate_integer_expression(expression: str) -> int:
    """The value of an integer expression of + - * // % and parentheses. The text is parsed into a syntax tree and
    only those nodes are evaluated: no name, call or attribute can run, so model output never reaches eval."""
    if len(expression) > 200:
        raise ValueError("the expression is longer than 200 characters")
    tree = ast.parse(expression.strip(), mode="eval")

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            result = _BINARY[type(node.op)](value(node.left), value(node.right))
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            result = _UNARY[type(node.op)](value(node.operand))
        else:
            raise ValueError(f"only integers, + - * // % and parentheses are allowed, not {ast.dump(node)[:60]}")
        if len(str(abs(result))) > MAX_DIGITS:
            raise ValueError(f"the result has more than {MAX_DIGITS} digits")
        return int(result)

    return value(tree.body)


class CalculatorArithmetic:
    """One question per episode, from the row's prompt (its ground_truth is the answer). The model may call
    `calculate` any number of times; its first turn without a tool call is its answer, scored 1 when the last
    integer in it is the ground truth, else 0."""

    def reset(self, row: Mapping[str, Any]) -> None:
        self.answer = str(row["ground_truth"]).strip()
        return None  # the conversation starts from the row's prompt

    def step(self, action: str) -> StepResult:
        found = _LAST_INTEGER.findall(action)
        correct = bool(found) and found[-1] == self.answer
        return StepResult(None, float(correct), True, {"answered": found[-1] if found else None})

    def calculate(self, expression: str) -> str:
        """Computes an integer arithmetic expression.

        Args:
            expression: integers with + - * // % and parentheses, e.g. "123*45"
        """
        return str(evaluate_integer_expression(expression))
