"""Countdown scorer (TinyZero): the <answer> equation must reach the target using each given number once at most.

The equation is model output, so it is never eval'd: it is parsed with `ast`, only integer literals, + - * /, unary
signs and parentheses are accepted, and it is evaluated exactly with Fractions. Its length is bounded before parsing,
and its literals are checked against the given numbers before any arithmetic, so the work per sample is bounded.
"""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import Any

# Only the response's tail is searched for tags: the final answer comes last, and this bounds the scan.
SOLUTION_CLIP_CHARS = 10_000
# A 6-number equation with spaces and parentheses fits in well under 200 characters; longer is not an answer.
MAX_EQUATION_CHARS = 256

_ALLOWED_CHARACTERS = re.compile(r"[0-9+\-*/()\s]*")
_BINARY_OPERATORS: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


class InvalidEquation(ValueError):
    """The answer is not an equation over the given numbers that this scorer accepts."""


def extract_answer(solution_str: str) -> str | None:
    """The text of the last <answer>...</answer> in the response's tail, stripped; None without a complete pair.

    Found with rfind, not a regex, so that a response full of unclosed '<answer>' tags costs linear time.
    """
    tail = solution_str[-SOLUTION_CLIP_CHARS:]
    close_at = tail.rfind("</answer>")
    if close_at < 0:
        return None
    open_at = tail.rfind("<answer>", 0, close_at)
    if open_at < 0:
        return None
    return tail[open_at + len("<answer>") : close_at].strip()


def _literals(node: ast.AST) -> list[int]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, int)]


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise InvalidEquation("division by zero")
        return _BINARY_OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    raise InvalidEquation(f"{type(node).__name__} is not allowed; use integers, + - * / and parentheses")


def evaluate_equation(equation: str, numbers: Iterable[int]) -> Fraction:
    """The exact value of `equation`, after checking that it uses only `numbers`, each at most once.

    Raises InvalidEquation for anything else: a disallowed character or construct, a number that is not given or is
    used more often than given, division by zero, or more than MAX_EQUATION_CHARS characters.
    """
    if len(equation) > MAX_EQUATION_CHARS:
        raise InvalidEquation(f"equation has {len(equation)} characters, more than {MAX_EQUATION_CHARS}")
    if not _ALLOWED_CHARACTERS.fullmatch(equation):
        raise InvalidEquation(f"equation {equation!r} has characters other than digits, + - * / ( ) and spaces")
    try:
        tree = ast.parse(equation, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise InvalidEquation(f"equation {equation!r} does not parse: {error}") from error
    used = Counter(_literals(tree))
    available = Counter(int(number) for number in numbers)
    overused = used - available
    if overused:
        raise InvalidEquation(f"numbers {sorted(overused.elements())} are not given or used more often than given")
    return _evaluate(tree)


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    *,
    format_score: float = 0.0,
    score: float = 1.0,
) -> dict[str, Any]:
    """`score` for an equation that reaches ground_truth['target'] using ground_truth['numbers'] at most once each;
    `format_score` for an <answer> that is present but wrong or invalid; 0 without an <answer>.

    TinyZero used format_score=0.1 (set it with load_compute_score(..., format_score=0.1)); the default rewards only
    correct equations.
    """
    target = Fraction(int(ground_truth["target"]))
    numbers = [int(number) for number in ground_truth["numbers"]]
    equation = extract_answer(solution_str)
    if equation is None:
        return {"score": 0.0, "acc": False, "pred": None}
    try:
        correct = evaluate_equation(equation, numbers) == target
    except InvalidEquation:
        correct = False
    return {"score": score if correct else format_score, "acc": correct, "pred": equation[:MAX_EQUATION_CHARS]}
