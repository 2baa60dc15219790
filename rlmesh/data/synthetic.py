"""Synthetic tasks (arithmetic, countdown, digit_sort) generated locally, deterministic for a seed, as verl-format rows.

A row is what verl's prompt datasets hold:
    {"data_source": "arithmetic", "prompt": [{"role": "user", "content": "23+45="}], "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": "68"}, "extra_info": {"split": "train", "index": 0, ...}}
and rlmesh.reward's built-in scorer for the same data_source grades the responses.

Train and test never share a problem: every problem has a key (e.g. '23+45'), and a hash of the key puts a fixed
`held_out_fraction` of all problems in the test split only. The partition does not depend on the seed or the sizes,
so a train set made on the fly during training still never contains a test problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

PromptStyle = Literal["bare", "instruction"]
SPLITS = ("train", "test")
# Held out by default: 2,000 of the 10,000 two-digit additions, enough for a stable held-out accuracy.
DEFAULT_HELD_OUT_FRACTION = 0.2
_ANSWER_INSTRUCTION = 'Give the final answer after "####".'


@dataclass(frozen=True)
class Problem:
    """One generated problem: `key` identifies it (for dedup and the held-out split), `question` is the prompt text."""

    key: str
    question: str
    ground_truth: Any
    extra_info: dict[str, Any]


class SyntheticTask(Protocol):
    """A task: a frozen dataclass whose fields are its difficulty settings, drawing one problem at a time."""

    name: ClassVar[str]
    ability: ClassVar[str]

    def sample(self, rng: random.Random) -> Problem: ...


def _check_prompt_style(prompt_style: str) -> None:
    if prompt_style not in ("bare", "instruction"):
        raise ValueError(f"prompt_style must be 'bare' or 'instruction', got {prompt_style!r}")


@dataclass(frozen=True)
class ArithmeticTask:
    """Integer arithmetic over `num_operands` operands, each uniform in [0, 10**digits), operators drawn from
    `operators` (a string of '+', '-', '*'), with the usual precedence ('*' before '+' and '-').

    The bare prompt is the expression and '=' with no spaces, '23+45=', and the ground truth is the decimal answer,
    '68' ('-12' can only occur when '-' is an operator). That is the whole vocabulary of the default recipe's
    character-level model: digits, '+', '-', '*', '='. prompt_style='instruction' asks in words, for chat models:
    'What is 23+45? Give the final answer after "####".'
    """

    name: ClassVar[str] = "arithmetic"
    ability: ClassVar[str] = "math"
    ALLOWED_OPERATORS: ClassVar[str] = "+-*"

    digits: int = 2
    operators: str = "+"
    num_operands: int = 2
    prompt_style: PromptStyle = "bare"

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 18:
            raise ValueError(f"digits must be in [1, 18], got {self.digits}")
        if not self.operators or set(self.operators) - set(self.ALLOWED_OPERATORS):
            raise ValueError(
                f"operators must be a non-empty string of {self.ALLOWED_OPERATORS!r}, got {self.operators!r}"
            )
        if self.num_operands < 2:
            raise ValueError(f"num_operands must be at least 2, got {self.num_operands}")
        _check_prompt_style(self.prompt_style)

    def sample(self, rng: random.Random) -> Problem:
        operands = [rng.randrange(10**self.digits) for _ in range(self.num_operands)]
        # sorted() so that '+-' and '-+' draw the same problems for a seed.
        operators = [rng.choice(sorted(set(self.operators))) for _ in range(self.num_operands - 1)]
        expression = str(operands[0]) + "".join(
            f"{op}{operand}" for op, operand in zip(operators, operands[1:], strict=True)
        )
        answer = str(_evaluate_with_precedence(operands, operators))
        bare = self.prompt_style == "bare"
        question = f"{expression}=" if bare else f"What is {expression}? {_ANSWER_INSTRUCTION}"
        return Problem(key=expression, question=question, ground_truth=answer, extra_info={"expression": expression})


def _evaluate_with_precedence(operands: list[int], operators: list[str]) -> int:
    """operands[0] op0 operands[1] op1 ..., multiplying first, then adding and subtracting left to right."""
    terms, signs = [operands[0]], []
    for operator, operand in zip(operators, operands[1:], strict=True):
        if operator == "*":
            terms[-1] *= operand
        else:
            signs.append(operator)
            terms.append(operand)
    total = terms[0]
    for sign, term in zip(signs, terms[1:], strict=True):
        total = total + term if sign == "+" else total - term
    return total


@dataclass(frozen=True)
class CountdownTask:
    """TinyZero's Countdown: reach `target` with `num_numbers` numbers in [1, max_number], using + - * / and each
    number at most once; the answer is an equation in <answer>...</answer>.

    Every problem is solvable: the target is built by combining all the numbers in a random order with random
    operations (keeping intermediate results positive integers), and that equation is kept in
    extra_info['solution']. Targets lie in [1, max_target]; TinyZero's dataset has 3 or 4 numbers and targets to 100.
    """

    name: ClassVar[str] = "countdown"
    ability: ClassVar[str] = "math"

    num_numbers: int = 4
    max_number: int = 99
    max_target: int = 100

    def __post_init__(self) -> None:
        if not 2 <= self.num_numbers <= 6:
            raise ValueError(f"num_numbers must be in [2, 6], got {self.num_numbers}")
        if self.max_number < 2:
            raise ValueError(f"max_number must be at least 2, got {self.max_number}")
        if self.max_target < 1:
            raise ValueError(f"max_target must be at least 1, got {self.max_target}")

    def sample(self, rng: random.Random) -> Problem:
        # Few draws are rejected (a product overshooting max_target); the bound only guards absurd settings.
        for _ in range(10_000):
            numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
            target, solution = _random_combination(numbers, rng)
            if 1 <= target <= self.max_target:
                question = (
                    f"Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
                    "arithmetic operations (+, -, *, /) and each number can be used at most once. Show your work in "
                    "<think> </think> tags. And return the final equation in <answer> </answer> tags, for example "
                    "<answer> (1 + 2) / 3 </answer>."
                )
                return Problem(
                    key=f"{sorted(numbers)}->{target}",
                    question=question,
                    ground_truth={"target": target, "numbers": numbers},
                    extra_info={"solution": solution},
                )
        raise ValueError(f"no target in [1, {self.max_target}] after 10,000 draws for {self}; raise max_target")


def _random_combination(numbers: list[int], rng: random.Random) -> tuple[int, str]:
    """Combines all numbers pairwise with random operations into one positive integer; returns it and its equation."""
    pool = [(number, str(number)) for number in numbers]
    while len(pool) > 1:
        (a, a_text), (b, b_text) = (pool.pop(rng.randrange(len(pool))) for _ in range(2))
        choices = [(a + b, f"({a_text} + {b_text})"), (a * b, f"({a_text} * {b_text})")]
        if a > b:
            choices.append((a - b, f"({a_text} - {b_text})"))
        if a % b == 0:
            choices.append((a // b, f"({a_text} / {b_text})"))
        pool.append(rng.choice(choices))
    value, text = pool[0]
    return value, text[1:-1] if text.startswith("(") else text


@dataclass(frozen=True)
class DigitSortTask:
    """Sort a string of `length` random digits in ascending order: bare prompt '52913=', ground truth '12359'.

    It uses the same character vocabulary as arithmetic and needs counting rather than carrying, so it tests
    whether a recipe learns beyond one task. prompt_style='instruction' asks in words, with the answer after '####'.
    """

    name: ClassVar[str] = "digit_sort"
    ability: ClassVar[str] = "algorithm"

    length: int = 5
    prompt_style: PromptStyle = "bare"

    def __post_init__(self) -> None:
        if not 1 <= self.length <= 64:
            raise ValueError(f"length must be in [1, 64], got {self.length}")
        _check_prompt_style(self.prompt_style)

    def sample(self, rng: random.Random) -> Problem:
        digits = "".join(rng.choice("0123456789") for _ in range(self.length))
        if self.prompt_style == "bare":
            question = f"{digits}="
        else:
            question = f"Sort the digits of {digits} in ascending order. {_ANSWER_INSTRUCTION}"
        return Problem(key=digits, question=question, ground_truth="".join(sorted(digits)), extra_info={})


TASKS: dict[str, type[ArithmeticTask] | type[CountdownTask] | type[DigitSortTask]] = {
    task.name: task for task in (ArithmeticTask, CountdownTask, DigitSortTask)
}


def make_task(task: str, **difficulty: Any) -> SyntheticTask:
    """The task named `task` with its difficulty settings; unknown names or settings raise, listing the valid ones."""
    if task not in TASKS:
        raise KeyError(f"unknown synthetic task {task!r}; known: {sorted(TASKS)}")
    task_class = TASKS[task]
    settings = {field.name: field.default for field in dataclasses.fields(task_class)}
    unknown = sorted(set(difficulty) - set(settings))
    if unknown:
        raise TypeError(f"task {task!r} has no setting(s) {unknown}; its settings and defaults are {settings}")
    return task_class(**difficulty)


def is_held_out(task: str, key: str, held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION) -> bool:
    """Whether problem `key` of `task` belongs to the test split: a stable hash, the same on every machine and run."""
    digest = hashlib.blake2b(f"{task}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < held_out_fraction


def make_task_rows(
    task: str,
    n: int,
    seed: int,
    split: str = "train",
    *,
    held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION,
    unique: bool = True,
    start_index: int = 0,
    **difficulty: Any,
) -> list[dict[str, Any]]:
    """`n` verl-format rows of `task` for `split` ('train' or 'test'), the same for the same arguments.

    Problems never cross splits (see is_held_out; use one held_out_fraction for both). `unique` draws distinct
    problems, and raises if the split has fewer than `n`; unique=False draws with replacement, as a loop generating
    prompts on the fly may. Indexes in extra_info start at `start_index`. `difficulty` are the task's settings,
    e.g. digits=3, operators='+-*' for arithmetic.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    task_instance = make_task(task, **difficulty)
    settings = dataclasses.asdict(task_instance)  # type: ignore[call-overload]
    # Seeded by a string: random.Random hashes it with SHA-512, so the stream is the same in every process.
    rng = random.Random(f"{task}/{split}/{seed}")
    want_held_out = split == "test"
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    max_draws = 100 * n + 10_000
    for _ in range(max_draws):
        if len(rows) == n:
            break
        problem = task_instance.sample(rng)
        if is_held_out(task, problem.key, held_out_fraction) != want_held_out or (unique and problem.key in seen):
            continue
        seen.add(problem.key)
        rows.append(
            {
                "data_source": task,
                "prompt": [{"role": "user", "content": problem.question}],
                "ability": task_instance.ability,
                "reward_model": {"style": "rule", "ground_truth": problem.ground_truth},
                "extra_info": {"split": split, "index": start_index + len(rows), **problem.extra_info, **settings},
            }
        )
    if len(rows) < n:
        raise ValueError(
            f"found only {len(rows)} distinct {split} problems of {task_instance} in {max_draws} draws, {n} asked "
            f"(held_out_fraction={held_out_fraction}). Ask for fewer rows, make the task harder (more digits or "
            "numbers), or pass unique=False."
        )
    return rows
