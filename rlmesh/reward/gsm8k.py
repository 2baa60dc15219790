"""GSM8K scorer: the final number after '####' (strict) or the last number in the response (flexible), as verl."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

# verl matches only the response's tail: the answer sits at the end, and regexes over 30k-token responses cost time.
SOLUTION_CLIP_CHARS = 300

_STRICT_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
_ANY_NUMBER = re.compile(r"(\-?[0-9\.\,]+)")

GSM8K_METHODS = ("strict", "flexible")


def extract_gsm8k_answer(solution_str: str, method: Literal["strict", "flexible"] = "strict") -> str | None:
    """The answer in the last SOLUTION_CLIP_CHARS characters: the last '#### N' (strict) or the last number (flexible).

    Commas and '$' are dropped, so '#### 1,000' gives '1000'. None when nothing matches.
    """
    if method not in GSM8K_METHODS:
        raise ValueError(f"gsm8k method must be one of {GSM8K_METHODS}, got {method!r}")
    tail = solution_str[-SOLUTION_CLIP_CHARS:]
    if method == "strict":
        matches = _STRICT_ANSWER.findall(tail)
        return matches[-1].replace(",", "").replace("$", "") if matches else None
    for candidate in reversed(_ANY_NUMBER.findall(tail)):
        candidate = candidate.replace(",", "")
        if candidate not in ("", ".", "-", "-."):
            return candidate
    return None


def _normalize_number(text: str) -> str:
    """'18.00' and '18' and '18.' compare equal; text that is not a number is compared as written."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return str(Decimal(text).normalize())
    except InvalidOperation:
        return text


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    *,
    method: Literal["strict", "flexible"] = "strict",
    format_score: float = 0.0,
    score: float = 1.0,
) -> dict[str, Any]:
    """verl's gsm8k reward: `score` for the right number, `format_score` for a wrong one, 0 when none is found.

    Unlike verl's string comparison, numbers compare by value ('18.00' equals '18'), so a correct answer
    written with a trailing '.0' is not punished.
    """
    pred = extract_gsm8k_answer(solution_str, method=method)
    if pred is None:
        return {"score": 0.0, "acc": False, "pred": None}
    correct = _normalize_number(pred) == _normalize_number(str(ground_truth))
    return {"score": score if correct else format_score, "acc": correct, "pred": pred}
