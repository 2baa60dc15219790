"""Math scorer: the model's final answer against the reference, compared for equivalence by the math-verify library."""

from __future__ import annotations

import threading
from typing import Any

# The boxed answer sits at the end; parsing the whole of a 30k-token response costs seconds for nothing.
SOLUTION_CLIP_CHARS = 4000
# math-verify's own per-call limit, in whole seconds (it uses signal.alarm, so it only works on the main thread).
MATH_VERIFY_TIMEOUT_S = 5


def _math_verify_timeout() -> int | None:
    """math-verify's signal-based timeout raises off the main thread; there the scorer pool's deadline is the guard."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


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

    The response's answer is its last \\boxed{...} or, failing that, its last plain expression, so
    '\\boxed{\\frac{1}{2}}', '0.5' and '1/2' all match a ground truth of '\\frac{1}{2}'. The ground truth is read as
    LaTeX, wrapped in \\boxed{} as verl does, since MATH's answers are LaTeX without delimiters.
    """
    # Imported here: math-verify pulls in sympy (about a second), which gsm8k or arithmetic runs never need.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    timeout = _math_verify_timeout()
    gold_text = str(ground_truth).strip()
    gold = parse(f"\\boxed{{{gold_text}}}", extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout)
    if not gold:
        # A ground truth that is not LaTeX (say '3 + x') still parses as a plain expression.
        gold = parse(gold_text, extraction_config=[ExprExtractionConfig()], parsing_timeout=timeout)
    pred = parse(
        solution_str[-SOLUTION_CLIP_CHARS:],
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=timeout,
    )
    correct = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=timeout)
    # parse returns [sympy expression, matched string]; the string is what the model wrote.
    pred_text = str(pred[-1]) if pred else None
    return {"score": score if correct else wrong_score, "acc": correct, "pred": pred_text}
