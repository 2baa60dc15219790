"""Math scorer: the model's final answer against the reference, compared for equivalence by the math-verify library.

Model output never reaches `eval`: math-verify's plain-expression extractor runs sympy's `parse_expr`, which
evaluates Python code, so plain answers ('1/2', 'Answer: 42') are read by `plain_number` below, an `ast` walk that
admits numbers and + - * / ^ only. LaTeX answers go through math-verify's LaTeX parser (ANTLR, no eval).
"""

from __future__ import annotations

import ast
import functools
import re
import threading
from typing import Any

# The boxed answer sits at the end; parsing the whole of a 30k-token response costs seconds for nothing.
SOLUTION_CLIP_CHARS = 4000
# math-verify's own per-call limit, in whole seconds (it uses signal.alarm, so it only works on the main thread).
MATH_VERIFY_TIMEOUT_S = 5
# A plain answer: numbers (1,000 and 0.5 included) joined by + - * / ^; the last one in the response is the answer.
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_PLAIN = re.compile(rf"(?<![\w.])-?(?:{_NUMBER})(?:\s*[-+*/^]\s*\(?-?(?:{_NUMBER})\)?)*")
MAX_PLAIN_CHARS = 100
MAX_EXPONENT = 64  # '9^9^9' would take sympy minutes and gigabytes


@functools.cache  # once per process: patching the class is not per-sample work
def _build_numbers_without_eval() -> None:
    """math-verify's LaTeX reader (latex2sympy2_extended) makes each number token with sympy.Number(text), which
    sympify()s the text, and sympify runs eval. The grammar admits digits only there, but the guarantee that model
    output never reaches eval should not rest on a grammar: numbers are built from int / Rational instead."""
    import sympy
    from latex2sympy2_extended import latex2sympy2

    def parse_number(self: Any, text: str) -> Any:
        text = text.replace(",", "")
        if not re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", text):
            raise ValueError(f"not a number token: {text[:40]!r}")
        return sympy.Integer(int(text)) if text.isdigit() else sympy.Float(text)

    latex2sympy2._Latex2Sympy.parse_number = parse_number


def _math_verify_timeout() -> int | None:
    """math-verify's signal-based timeout raises off the main thread; there the scorer pool's deadline is the guard."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def plain_number(text: str) -> Any:
    """The last plain arithmetic answer in `text` as a sympy number (e.g. '1/2' -> 1/2), or None. Parsed with `ast`
    and built node by node, so nothing in `text` is ever executed."""
    import sympy

    matches = [m.group(0) for m in _PLAIN.finditer(text)]
    if not matches or len(matches[-1]) > MAX_PLAIN_CHARS:
        return None
    source = re.sub(r"(?<=\d),(?=\d{3})", "", matches[-1]).replace("^", "**")
    operators = {ast.Add: sympy.Add, ast.Mult: sympy.Mul}

    def build(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return build(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return sympy.Integer(node.value) if isinstance(node.value, int) else sympy.Rational(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = build(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            left, right = build(node.left), build(node.right)
            if type(node.op) in operators:
                return operators[type(node.op)](left, right)
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Div):
                return left / right
            if isinstance(node.op, ast.Pow) and right.is_integer and abs(int(right)) <= MAX_EXPONENT:
                return left**right
        raise ValueError(f"not a plain arithmetic answer: {ast.dump(node)[:80]}")

    try:
        value = build(ast.parse(source, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None
    return value if value.is_finite else None


def _parse_answer(text: str, latex_config: Any, timeout: int | None) -> list[Any]:
    """math-verify's [expression, matched text] for `text`: its LaTeX answer, else its last plain number."""
    from math_verify import parse

    found = parse(text, extraction_config=[latex_config], parsing_timeout=timeout)
    if found:
        return list(found)
    number = plain_number(text)
    return [number, str(number)] if number is not None else []


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    *,
    score: float = 1.0,
    wrong_score: float = 0.0,
) -> dict[str, Any]:
    """`score` when math-verify finds the response's answer equivalent to `ground_truth`, else `wrong_score`.

    The response's answer is its last \\boxed{...} (or other LaTeX answer) or, failing that, its last plain number,
    so '\\boxed{\\frac{1}{2}}', '0.5' and '1/2' all match a ground truth of '\\frac{1}{2}'. The ground truth is read
    as LaTeX, wrapped in \\boxed{} as verl does, since MATH's answers are LaTeX without delimiters.
    """
    # Imported here: math-verify pulls in sympy (about a second), which gsm8k or arithmetic runs never need.
    from math_verify import LatexExtractionConfig, verify

    _build_numbers_without_eval()

    timeout = _math_verify_timeout()
    latex = LatexExtractionConfig()
    gold_text = str(ground_truth).strip()
    gold = _parse_answer(f"\\boxed{{{gold_text}}}", latex, timeout) or _parse_answer(gold_text, latex, timeout)
    pred = _parse_answer(solution_str[-SOLUTION_CLIP_CHARS:], latex, timeout)
    correct = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=timeout)
    # parse returns [sympy expression, matched string]; the string is what the model wrote.
    pred_text = str(pred[-1]) if pred else None
    return {"score": score if correct else wrong_score, "acc": correct, "pred": pred_text}
