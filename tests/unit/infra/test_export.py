"""rlmesh export: a checkpoint's policy as a clean Hugging Face folder; policy_folder's lookup of checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlmesh.checkpoint import COMPLETE_MARKER, LATEST_MARKER, policy_folder
from rlmesh.cli import main
from rlmesh.export import check_weights, export_checkpoint
from tests.conftest import REPO

TINY = REPO / "rlmesh" / "assets" / "tiny-arith"


def fake_run(tmp_path: Path, steps: tuple[int, ...] = (2, 4)) -> Path:
    """A run folder as training writes it: checkpoints/step_N/{policy, policy_state, state.json, COMPLETE}."""
    run = tmp_path / "run"
    for step in steps:
        folder = run / "checkpoints" / f"step_{step:06d}"
        shutil.copytree(TINY, folder / "policy")
        (folder / "policy_state").mkdir()
        (folder / "policy_state" / "rank0.pt").write_bytes(b"optimizer state")
        (folder / "state.json").write_text("{}")
        (folder / COMPLETE_MARKER).write_text("")
    (run / "checkpoints" / LATEST_MARKER).write_text(f"step_{steps[-1]:06d}")
    return run


def test_policy_folder_finds_the_latest_checkpoint_from_a_run_or_checkpoints_folder(tmp_path: Path):
    run = fake_run(tmp_path)
    latest = run / "checkpoints" / "step_000004" / "policy"
    assert policy_folder(run) == latest
    assert policy_folder(run / "checkpoints") == latest
    assert policy_folder(run / "checkpoints" / "step_000002") == run / "checkpoints" / "step_000002" / "policy"
    assert policy_folder(TINY) == TINY
    (run / "checkpoints" / "step_000002" / COMPLETE_MARKER).unlink()
    with pytest.raises(FileNotFoundError, match="never committed"):
        policy_folder(run / "checkpoints" / "step_000002")
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face model folder"):
        policy_folder(tmp_path / "nothing-here")


def test_export_writes_only_the_hf_files_with_the_weights_unchanged(tmp_path: Path):
    run = fake_run(tmp_path)
    out = export_checkpoint(run, tmp_path / "exported")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"} <= names
    assert not names & {"policy_state", "state.json", COMPLETE_MARKER}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # the staging folder became `out`
    source = load_file(run / "checkpoints" / "step_000004" / "policy" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert source.keys() == exported.keys() and all(torch.equal(source[k], exported[k]) for k in source)
    tokenizer = AutoTokenizer.from_pretrained(out)
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == tokenizer.eos_token_id is not None
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    ids = torch.tensor([tokenizer.encode("12+34=")])
    reference = AutoModelForCausalLM.from_pretrained(TINY, use_safetensors=True)
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_export_casts_to_a_dtype_on_request(tmp_path: Path):
    out = export_checkpoint(TINY, tmp_path / "bf16", dtype="bfloat16")
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).dtype == torch.bfloat16


def test_export_refuses_a_non_empty_target_and_leaves_nothing_behind_on_bad_weights(tmp_path: Path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_checkpoint(TINY, taken)
    assert (taken / "keep.txt").read_text() == "mine"
    broken = tmp_path / "broken"
    shutil.copytree(TINY, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = sorted(weights)[-1]
    save_file({k: v for k, v in weights.items() if k != dropped}, broken / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        check_weights(broken)
    with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        export_checkpoint(broken, tmp_path / "from-broken")
    assert not (tmp_path / "from-broken").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_the_export_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run = fake_run(tmp_path)
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as exited:
        main(["export", str(tmp_path / "missing"), str(tmp_path / "out2")])
    assert exited.value.code == 2
    assert "neither a Hugging Face model folder" in capsys.readouterr().err
