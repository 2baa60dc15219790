"""What a run says before it starts (the resolved roles, their classes, shapes and resources, the model's size,
where outputs go, an estimate of the start-up) and when it ends (the best validation score and its step, the final
checkpoint, the plot)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlmesh.checkpoint import CheckpointManager
from rlmesh.config import RlmeshConfig
from rlmesh.plan import RunPlan

# Start-up seconds measured on this project's machines: a vLLM engine 13-20 s on 2 CPU cores (loading, KV cache,
# no CUDA graphs) and about a minute on a GPU with graphs captured; other roles a few seconds; weights read at about
# 1 GB/s. Meshes of one wave start together, so a wave costs its slowest role.
ENGINE_START_S = {"cpu": 20.0, "cuda": 60.0}
ROLE_START_S = 5.0
READ_GB_PER_S = 1.0


def parameter_count(model_path: str, trust_remote_code: bool = False) -> int | None:
    """The policy's parameters, from its config on the meta device (nothing is loaded); None if it cannot be built."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def startup_estimate_s(plan: RunPlan, parameters: int | None) -> float:
    """Seconds until the roles are up: per wave its slowest role (a vLLM engine, else ROLE_START_S), plus reading
    the weights (2 bytes a parameter) once per wave."""
    read = (parameters or 0) * 2 / 1e9 / READ_GB_PER_S
    waves: dict[int, float] = {}
    for spec in plan.roles:
        engine = "vllm" in spec.cls.__module__
        seconds = ENGINE_START_S.get(plan.device, ENGINE_START_S["cuda"]) if engine else ROLE_START_S
        waves[spec.wave] = max(waves.get(spec.wave, 0.0), seconds + read)
    return sum(waves.values())


def _resources(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in values.items()) or "-"


def startup_lines(
    cfg: RlmeshConfig, plan: RunPlan, run_dir: Path, data_report: Mapping[str, float], total_steps: int
) -> tuple[list[str], list[tuple[str, str, str, str, str]]]:
    """The start-up summary: lines of settings, and a table of roles (role, class, shape, resources per actor,
    contracts)."""
    parameters = parameter_count(cfg.model.path, cfg.model.trust_remote_code)
    size = f"{parameters / 1e6:,.1f}M parameters" if parameters is not None else "size unknown"
    trainer = cfg.trainer
    train_rows, val_rows = int(data_report.get("data/train/rows", 0)), int(data_report.get("data/val/rows", 0))
    lines = [
        f"recipe {cfg.recipe}: {cfg.algorithm.adv_estimator}, trainer.mode={trainer.mode}, device {plan.device}, "
        f"weights synced over {plan.weight_sync}",
        f"model {cfg.model.path} ({size})",
        f"data: {train_rows:,} training and {val_rows:,} validation prompts; {total_steps} steps of "
        f"{cfg.data.train_batch_size} prompts x {cfg.roles.rollout.n}",
        f"outputs: {run_dir} (metrics.jsonl, checkpoints/, traces/, curves.png)"
        + (f"; rollouts dumped to {trainer.dump_rollouts}" if trainer.dump_rollouts else ""),
        f"roles start in about {startup_estimate_s(plan, parameters):.0f} s (an estimate; the first step then runs)",
    ]
    if trainer.replay_rollouts:
        lines.append(f"replaying the samples of {trainer.replay_rollouts}: no engines, no validation")
    rows = [
        (
            spec.name,
            f"{spec.cls.__module__}.{spec.cls.__qualname__}",
            " x ".join(f"{k}={v}" for k, v in spec.shape.items()),
            _resources(spec.resources) + (f" (with {spec.colocate_with})" if spec.colocate_with else ""),
            ", ".join(c.__name__ for c in spec.contracts),
        )
        for spec in plan.roles
    ]
    return lines, rows


def best_validation(rows: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """{metric, value, step} of the highest validation accuracy logged (the first val-core/*/acc/* key; the earliest
    step of a tie), or {} when nothing was validated. Rows are metrics.jsonl's (`step`) or the loop's history."""
    keys = [k for m in rows for k in m if k.startswith("val-core/") and "/acc/" in k]
    if not keys:
        return {}
    key = keys[0]
    scored = [
        (float(m[key]), int(m.get("step", m.get("training/global_step", 0))))
        for m in rows
        if isinstance(m.get(key), int | float) and math.isfinite(m[key])  # the jsonl writes NaN as null
    ]
    if not scored:
        return {}
    value, step = max(scored, key=lambda pair: (pair[0], -pair[1]))
    return {"metric": key, "value": value, "step": step}


def end_lines(run_dir: Path, history: Sequence[Mapping[str, float]], plot: Path | None, seconds: float) -> list[str]:
    """The end-of-run summary: steps and time, the best validation score and its step, the final checkpoint, the
    plot and the traces."""
    logged = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in logged.read_text().splitlines()] if logged.is_file() else list(history)
    lines = [f"{len(history)} steps in {seconds / 60:.1f} min"]
    best = best_validation(rows)
    if best:
        lines.append(f"best {best['metric']} = {best['value']:.4f} at step {best['step']}")
    latest = CheckpointManager(run_dir / "checkpoints", keep_last=1).latest()
    lines.append(f"final checkpoint: {latest}" if latest else "no checkpoint written (trainer.save_freq=0)")
    if latest:
        lines.append(f"evaluate it: rlmesh eval {latest}; export it: rlmesh export {latest} OUT")
    if plot is not None:
        lines.append(f"plot: {plot}")
    if (run_dir / "traces").is_dir():
        lines.append(f"traces: {run_dir / 'traces'} (chrome://tracing or ui.perfetto.dev)")
    return lines
