"""What rlmesh guarantees about untrusted input: model output, downloaded weights, checkpoints, user code paths.

The sockets a local run opens are listed in test_run_faults.py, during a real run.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rlmesh.config import ModelConfig
from rlmesh.engine.model_io import load_causal_lm
from rlmesh.reward import RewardScorer, ScoreItem, load_compute_score, math_answers
from tests.conftest import REPO

SOURCES = sorted((REPO / "rlmesh").rglob("*.py"))


def calls(name: str) -> list[tuple[Path, int, ast.Call]]:
    """Every call of `name` (a builtin like eval, or an attribute like torch.load) in rlmesh's source."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = (
                func.id if isinstance(func, ast.Name) else ast.unparse(func) if isinstance(func, ast.Attribute) else ""
            )
            if called == name:
                found.append((path.relative_to(REPO), node.lineno, node))
    return found


def test_rlmesh_never_calls_eval_exec_or_compile():
    assert [(str(p), line) for name in ("eval", "exec", "compile") for p, line, _ in calls(name)] == []


def test_every_torch_load_refuses_pickled_code():
    loads = calls("torch.load")
    assert loads, "no torch.load found: the check looked at nothing"
    for path, line, node in loads:
        options = {keyword.arg: keyword.value for keyword in node.keywords}
        assert isinstance(options.get("weights_only"), ast.Constant) and options["weights_only"].value is True, (
            f"{path}:{line}: torch.load without weights_only=True"
        )


@contextlib.contextmanager
def no_code_from_text() -> Iterator[list[str]]:
    """eval, exec and compile refuse text while inside (sympy's parse_expr, for one, compiles its input and evaluates
    it). Code objects of real files still run (that is how Python imports modules), and compile may build an AST
    (ast.parse), which runs nothing."""
    called: list[str] = []
    real = {name: getattr(builtins, name) for name in ("eval", "exec", "compile")}

    def tripwire(name: str) -> Any:
        def refuse(source: Any, *args: Any, **kwargs: Any) -> Any:
            only_ast = (
                name == "compile" and int(kwargs.get("flags", args[2] if len(args) > 2 else 0)) & ast.PyCF_ONLY_AST
            )
            if not only_ast and (
                isinstance(source, str | bytes) or not Path(getattr(source, "co_filename", "")).is_file()
            ):
                called.append(f"{name}({str(source)[:60]!r})")
                raise RuntimeError(f"{name} was called on {str(source)[:60]!r}")
            return real[name](source, *args, **kwargs)

        return refuse

    try:
        for name in real:
            setattr(builtins, name, tripwire(name))
        yield called
    finally:
        for name, function in real.items():
            setattr(builtins, name, function)


MODEL_OUTPUTS = [
    ("The answer is 1/2", "\\frac{1}{2}", 1.0),
    ("Answer: 42", "42", 1.0),
    ("So it is $\\boxed{\\frac{2}{4}}$.", "0.5", 1.0),
    ("2^10 = 1024", "1024", 1.0),
    ("__import__('os').system('touch /tmp/rlmesh-pwned')", "0", 0.0),
    ("(lambda: [c for c in ().__class__.__base__.__subclasses__()])()", "1", 0.0),
    ("9^9^9^9", "1", 0.0),
]


@pytest.mark.parametrize(("output", "truth", "score"), MODEL_OUTPUTS)
def test_math_answers_are_read_without_evaluating_model_output(output: str, truth: str, score: float):
    math_answers.compute_score("lighteval/MATH", "1", "1")  # imports math-verify and sympy first
    with no_code_from_text() as called:
        result = math_answers.compute_score("lighteval/MATH", output, truth)
    assert called == []
    assert result["score"] == score
    assert not Path("/tmp/rlmesh-pwned").exists()


def test_the_tripwire_catches_what_math_verify_does_on_its_own():
    """math-verify's own plain-expression extractor, which rlmesh does not use, goes through sympy's eval."""
    from math_verify import ExprExtractionConfig, parse

    with no_code_from_text() as called:
        parse("The answer is 1/2", extraction_config=[ExprExtractionConfig()])
    assert called, "the tripwire saw nothing: the test above would pass whatever the scorer did"


def test_weights_load_only_from_safetensors(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(REPO / "rlmesh" / "assets" / "tiny-arith")
    model.save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # an old-style pickled checkpoint
    with pytest.raises(OSError, match="safetensors"):
        load_causal_lm(ModelConfig(path=str(folder)), "cpu")


def test_checkpoint_state_is_loaded_without_pickle(tmp_path: Path):
    """A training state file that smuggles a pickled object is refused, where weights_only=False would run it."""

    class Payload:
        def __reduce__(self) -> Any:
            return (print, ("this ran while loading",))

    path = tmp_path / "rank0.pt"
    torch.save({"world_size": 1, "smuggled": Payload()}, path)
    from rlmesh.checkpoint import load_rank_state

    with pytest.raises(Exception, match="Weights only load failed"):
        load_rank_state(tmp_path, 0, 1)


def test_a_reward_file_is_imported_from_its_path_only(tmp_path: Path):
    """Loading a user's reward file runs that file and leaves sys.path as it was: its folder's other modules are
    not made importable behind the user's back."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "my_reward.py").write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return float(solution_str == ground_truth)\n"
    )
    (folder / "json.py").write_text("raise RuntimeError('a shadowing module was imported')\n")
    before = list(sys.path)
    scorer = RewardScorer(load_compute_score(folder / "my_reward.py"), num_workers=1, preload_modules=())
    with scorer:
        assert scorer.score([ScoreItem("x", "7", "7"), ScoreItem("x", "8", "7")]).scores == [1.0, 0.0]
    assert sys.path == before
