"""Exact-match scorer for the synthetic 'arithmetic' and 'digit_sort' tasks: the answer string must equal the truth."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Text a decoder may leave after the answer when special tokens are not skipped, or where a chat model stops.
END_MARKERS: tuple[str, ...] = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<eos>", "<|end|>", "\n")
# Instruction-style prompts ask for the final answer after this marker, as GSM8K does.
ANSWER_MARKER = "####"


def extract_exact_answer(solution_str: str, end_markers: Sequence[str] = END_MARKERS) -> str:
    """The answer the response gives: the text after the last '####' if there is one, else the whole response,
    cut at the first end marker, with surrounding whitespace (and, after '####', a closing '.') removed.

    '68', ' 68\\n', '68<|endoftext|>junk' and 'so 23+45 is 68.\\n#### 68.' all give '68'.
    """
    marker_at = solution_str.rfind(ANSWER_MARKER)
    after_marker = marker_at >= 0
    text = solution_str[marker_at + len(ANSWER_MARKER) :] if after_marker else solution_str
    text = text.lstrip()
    cut = min((at for at in (text.find(marker) for marker in end_markers if marker) if at >= 0), default=len(text))
    answer = text[:cut].strip()
    return answer.rstrip(".").rstrip() if after_marker else answer


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    *,
    score: float = 1.0,
    wrong_score: float = 0.0,
) -> dict[str, Any]:
    """`score` when the extracted answer equals str(ground_truth) exactly ('68' is not '068' nor '68.0'), else
    `wrong_score`. Exactness is the point: the tiny default model must learn to stop right after the answer."""
    pred = extract_exact_answer(solution_str)
    correct = pred == str(ground_truth).strip()
    return {"score": score if correct else wrong_score, "acc": correct, "pred": pred}
