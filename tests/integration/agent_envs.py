"""Environments that misbehave, for the agent-loop tests (a module of its own so Ray workers import them by name)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from rlmesh.envs.calculator import CalculatorArithmetic, evaluate_integer_expression


class FlakyCalculator(CalculatorArithmetic):
    """The calculator task, whose tool raises on an even first operand and hangs on an odd one that ends in 5."""

    async def calculate(self, expression: str) -> str:
        """Computes an integer arithmetic expression.

        Args:
            expression: integers with + - * // % and parentheses, e.g. "123*45"
        """
        first = int(expression.split("*")[0] or 0)
        if first % 2 == 0:
            raise RuntimeError("the calculator is out of order")
        if first % 10 == 5:
            await asyncio.sleep(60)
        return str(evaluate_integer_expression(expression))


class StepRaises(CalculatorArithmetic):
    def step(self, action: str) -> Any:
        raise ValueError("the grader crashed")


class ResetHangs(CalculatorArithmetic):
    def reset(self, row: Mapping[str, Any]) -> None:
        time.sleep(5)


class NeverDone(CalculatorArithmetic):
    """Asks again after every answer: only max_turns ends its episodes."""

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        return "Again.", 0.0, False, {}
