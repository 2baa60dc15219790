"""verl's compute_score signature, the built-in scorers chosen by data_source, and loading users' reward functions."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from rlmesh.reward import countdown, exact_match, gsm8k, math_answers


class ComputeScore(Protocol):
    """verl's reward function: a float, or a dict with a 'score' key whose other keys become metrics."""

    def __call__(
        self, data_source: str, solution_str: str, ground_truth: Any, extra_info: dict[str, Any] | None = None
    ) -> float | dict[str, Any]: ...


_MATH_DATA_SOURCES = (
    "DigitalLearningGmbH/MATH-lighteval",
    "lighteval/MATH",
    "HuggingFaceH4/MATH-500",
    "math_dapo",
    "math",
)

BUILTIN_SCORERS: dict[str, ComputeScore] = {
    "openai/gsm8k": gsm8k.compute_score,
    **dict.fromkeys(_MATH_DATA_SOURCES, math_answers.compute_score),
    "arithmetic": exact_match.compute_score,
    "digit_sort": exact_match.compute_score,
    "countdown": countdown.compute_score,
}
# verl scores every AIME variant ('aime24', 'aime2025', ...) as math.
_BUILTIN_PREFIXES: dict[str, ComputeScore] = {"aime": math_answers.compute_score}


class UnknownDataSourceError(LookupError):
    """No built-in scorer for a data_source."""


def builtin_scorer(data_source: str) -> ComputeScore:
    """The built-in scorer for `data_source`; UnknownDataSourceError, listing the known ones, if there is none."""
    scorer = BUILTIN_SCORERS.get(data_source)
    if scorer is None:
        scorer = next((s for prefix, s in _BUILTIN_PREFIXES.items() if str(data_source).startswith(prefix)), None)
    if scorer is None:
        known = sorted(BUILTIN_SCORERS) + [f"{prefix}*" for prefix in _BUILTIN_PREFIXES]
        raise UnknownDataSourceError(
            f"no built-in reward for data_source {data_source!r}; known: {known}. Set the dataset's data_source to "
            "one of them, or give your own compute_score file (load_compute_score(path, function_name))."
        )
    return scorer


def default_compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict[str, Any] | None = None
) -> float | dict[str, Any]:
    """Scores with the built-in scorer for `data_source` (see BUILTIN_SCORERS); unknown ones raise."""
    return builtin_scorer(data_source)(data_source, solution_str, ground_truth, extra_info)


# Per process: a worker imports each user file once, at its first sample, and keeps that version for the whole run.
_loaded_files: dict[str, ModuleType] = {}
_resolved_functions: dict[tuple[str, str], Callable[..., Any]] = {}


def _load_module_from_file(path: str) -> ModuleType:
    """Imports a .py file once per process, under a name unique to its path (verl's files often share a name)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"reward file {path!r} does not exist (resolved to {file}); give a path to a .py file")
    if str(file) in _loaded_files:
        return _loaded_files[str(file)]
    module_name = f"rlmesh_user_reward_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import reward file {file}: Python does not recognise it as a module; use a .py file")
    module = importlib.util.module_from_spec(spec)
    # Registered so that dataclasses and pickling inside the user's module can find it by name.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    _loaded_files[str(file)] = module
    return module


def _is_file_path(source: str) -> bool:
    return source.endswith(".py") or "/" in source or "\\" in source


@dataclass(frozen=True)
class LoadedComputeScore:
    """A reward function named by file path (or module name) and function name, with keyword arguments bound.

    It pickles as its path and name, not as code, so worker processes started with 'spawn' or 'forkserver' re-import
    the user's file themselves; a function from spec_from_file_location could not be pickled by reference.
    """

    source: str
    function_name: str = "compute_score"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> Callable[..., Any]:
        """The function itself: imports the file or module (once per process) and looks the name up."""
        cached = _resolved_functions.get((self.source, self.function_name))
        if cached is not None:
            return cached
        if _is_file_path(self.source):
            module = _load_module_from_file(self.source)
            where = f"reward file {self.source!r}"
        else:
            module = importlib.import_module(self.source)
            where = f"module {self.source!r}"
        function = getattr(module, self.function_name, None)
        if function is None:
            public = sorted(name for name, value in vars(module).items() if callable(value) and name[:1] != "_")
            raise AttributeError(
                f"{where} has no function {self.function_name!r}; it defines {public}. Set the function name to one "
                "of them."
            )
        if not callable(function):
            what = f"{type(function).__name__} {function!r}"[:100]
            raise TypeError(f"{where}: {self.function_name!r} is not callable (it is {what}); name a function")
        _resolved_functions[(self.source, self.function_name)] = function
        return function

    def __call__(
        self, data_source: str, solution_str: str, ground_truth: Any, extra_info: dict[str, Any] | None = None
    ) -> float | dict[str, Any]:
        return self.resolve()(data_source, solution_str, ground_truth, extra_info, **self.kwargs)


def load_compute_score(
    path: str | os.PathLike[str] | None = None, function_name: str = "compute_score", **kwargs: Any
) -> ComputeScore:
    """The reward function to use: default_compute_score when `path` is None, else `function_name` from `path`.

    `path` is a .py file (users' verl reward files work unchanged) or an importable module name such as
    'rlmesh.reward.countdown'. `kwargs` are bound to every call, like verl's `reward_kwargs`, e.g.
    load_compute_score('rlmesh.reward.gsm8k', method='flexible'). The function is imported now, so a missing file or
    function fails here, not in a worker halfway through training.
    """
    if path is None:
        if kwargs or function_name != "compute_score":
            raise ValueError(
                f"function_name={function_name!r} and kwargs {sorted(kwargs)} need a reward file path; "
                "without one the built-in default_compute_score is used and takes no options"
            )
        return default_compute_score
    loaded = LoadedComputeScore(os.fspath(path), function_name, dict(kwargs))
    loaded.resolve()
    return loaded
