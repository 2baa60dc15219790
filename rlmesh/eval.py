"""`rlmesh eval`: a checkpoint or Hugging Face model folder on verl-format validation data, on the rollout role's
engines as a mesh, scored by the run's reward role; mean@k, pass@k, maj@k per data source with bootstrap intervals.

python -m rlmesh.eval eval.checkpoint=RUN_OR_CHECKPOINT_OR_MODEL [recipe=NAME] [roles.rollout.val_n=8 ...]
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import hydra
import ray
from omegaconf import DictConfig, OmegaConf

from rlmesh.checkpoint import policy_folder
from rlmesh.config import RlmeshConfig, unknown_keys
from rlmesh.config_checks import ConfigError, check_config
from rlmesh.data import Batch, PromptRow
from rlmesh.mesh import start_store_worker
from rlmesh.metrics import evaluation_metrics
from rlmesh.recovery import RunFailed
from rlmesh.sampling import Sampler
from rlmesh.train import CONFIG_DIR, DataError, build_prompts, start_meshes, start_ray

if TYPE_CHECKING:
    from rlmesh.roles.contracts import AgentLoopMesh, RolloutMesh, ScorerMesh

log = logging.getLogger("rlmesh")

EVAL_ROLES = {"rollout", "reward", "agent"}  # what evaluation starts of the plan: no trainer, reference or critic
GENERATIONS = "generations.jsonl"
SUMMARY = "summary.json"


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        evaluate(with_run_config(cfg, list(HydraConfig.get().overrides.task)))
    except (RunFailed, ConfigError, DataError) as failed:
        log.error("%s", failed)
        sys.exit(1)


CONFIG_GROUPS = ("recipe", "rollout", "reward")  # command-line choices the run's saved config has already made


def run_config_of(checkpoint: str) -> Path | None:
    """The config.yaml of the rlmesh run that `checkpoint` (a run folder, or a checkpoint inside one) belongs to."""
    try:
        folder = policy_folder(checkpoint)
    except FileNotFoundError:
        return None
    if folder.parent.parent.name != "checkpoints":
        return None
    saved = folder.parents[2] / "config.yaml"
    return saved if saved.is_file() else None


def with_run_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """With eval.use_run_config and a checkpoint of an rlmesh run: that run's saved config, with the command line's
    key=value `overrides` on top (config-group choices such as recipe= were made by the run, and are ignored with a
    warning). Otherwise `cfg` as composed."""
    saved = run_config_of(cfg.eval.checkpoint) if cfg.eval.checkpoint and cfg.eval.use_run_config else None
    if saved is None:
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(RlmeshConfig), OmegaConf.load(saved))
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+")
        if override.startswith("~") or "=" not in override:
            continue
        if key in CONFIG_GROUPS:
            log.warning(
                "%s: ignored, the run's config (%s) is used; eval.use_run_config=false to compose", override, saved
            )
            continue
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override.lstrip("+")]))
    log.info("evaluating with the run's config %s and the overrides %s", saved, overrides)
    return cast(DictConfig, merged)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Generate roles.rollout.val_n samples per validation prompt with roles.rollout.val_sampling (the in-loop
    validation's settings and seeds), score them, write generations.jsonl and summary.json, print the table and
    return the metrics."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(
            [f"{key}: not a key rlmesh knows. Fix: check its spelling in rlmesh/config.py" for key in unknown]
        )
    cfg = cfg.copy()
    given = cfg.eval.checkpoint or cfg.model.path
    try:
        folder = policy_folder(given)
    except FileNotFoundError as err:
        key = "eval.checkpoint" if cfg.eval.checkpoint else "model.path"
        raise ConfigError(
            [f"{key}={given}: {err}. Fix: pass a run folder, a checkpoint folder or a Hugging Face model folder"]
        ) from None
    cfg.model.path = str(folder)  # the roles interpolate ${model}: the engines load this folder
    cfg.roles.rollout.colocate_with_trainer = False  # no trainer runs here to share devices with
    cfg.roles.rollout.enable_sleep_mode = False
    typed: RlmeshConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    plan = check_config(typed)
    out = Path(typed.eval.output_dir or default_output_dir(folder)).resolve()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=typed.model.trust_remote_code)
    _, prompts, _ = build_prompts(typed, tokenizer)
    if not prompts:
        raise DataError("no validation prompts: set data.val_files (verl parquet or jsonl) or data.task")
    rollout = typed.roles.rollout
    n, sampling = rollout.val_n, rollout.val_sampling
    log.info("evaluating %s: %d prompts x %d samples, temperature %s", folder, len(prompts), n, sampling.temperature)

    release = contextlib.ExitStack()
    if start_ray(typed, plan):
        release.callback(ray.shutdown)
    try:
        start_store_worker(["rlmesh.batch_stages"])
        meshes = start_meshes(typed, plan, 1, release, [], only=EVAL_ROLES)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sampler = Sampler(
            typed,
            cast("RolloutMesh", meshes["rollout"]),
            cast("ScorerMesh", meshes["reward"]),
            cast("AgentLoopMesh", meshes["agent"]) if "agent" in meshes else None,
            pad,
        )
        issued = sampler.issue(prompts, n, sampling, step=-1)  # step -1: the seeds in-loop validation uses
        wait_with_progress(issued.groups, enabled=typed.trainer.progress_bar)
        rows = sampler.assemble(issued)
        scored = sampler.score(rows).result({}).summary
        generations = rows.fetch()
    finally:
        release.close()
    if len(generations) != len(prompts) * n:  # episodes split into several samples: each counts once, by its first
        first = [i for i, e in enumerate(generations["episode"]) if e is not None] if "episode" in generations else []
        if len(first) != len(prompts) * n:
            raise RunFailed(f"{len(generations)} samples came back for {len(prompts)} prompts x {n}")
        generations, scored = generations[first], scored[first]
    accs = scored.get("acc")
    preds = scored.get("pred")
    metrics = evaluation_metrics(
        [p["data_source"] for p in prompts for _ in range(n)],
        scored["score"],
        accs,
        preds,
        n,
        resamples=typed.eval.bootstrap_samples,
        confidence=typed.eval.confidence,
        seed=typed.trainer.seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_generations(out / GENERATIONS, prompts, n, generations, scored, tokenizer)
    sampled = OmegaConf.to_container(cfg.roles.rollout.val_sampling, resolve=True)
    summary = {"model": str(folder), "prompts": len(prompts), "n": n, "sampling": sampled, "metrics": metrics}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    print_table(metrics, typed.eval.confidence)
    log.info("generations: %s; summary: %s", out / GENERATIONS, out / SUMMARY)
    return metrics


def default_output_dir(folder: Path) -> Path:
    """<run>/eval/step_N for a run's checkpoint (run/checkpoints/step_N/policy), else outputs/eval/<folder name>."""
    if folder.parent.parent.name == "checkpoints":
        return folder.parent.parent.parent / "eval" / folder.parent.name
    return Path("outputs") / "eval" / folder.name


def wait_with_progress(groups: list[Any], enabled: bool) -> None:
    """Wait for the prompts' requests one by one, with a progress bar (prompts done of all)."""
    from tqdm import tqdm

    for group in tqdm(groups, desc="eval", unit="prompt", disable=not enabled or not sys.stderr.isatty()):
        group.result()


def write_generations(
    path: Path, prompts: list[PromptRow], n: int, generations: Batch, scored: Batch, tokenizer: Any
) -> None:
    """One JSON line per sample: the prompt's index, data source and ground truth, the prompt and the response (decoded
    and as token ids), the engine's log-probs of the response tokens, and the scorer's fields (score, acc, pred)."""
    mask = generations["response_mask"].bool()
    fields = [key for key in scored.non_tensors if key != "reward_failure"]
    failures = scored.get("reward_failure")
    with path.open("w") as file:
        for i in range(len(generations)):
            prompt = prompts[i // n]
            response = generations["response_ids"][i][mask[i]].tolist()
            line: dict[str, Any] = {
                "index": prompt["index"],
                "sample": i % n,
                "data_source": prompt["data_source"],
                "ground_truth": prompt["ground_truth"],
                "prompt": tokenizer.decode(prompt["prompt_ids"], skip_special_tokens=False),
                "prompt_ids": list(prompt["prompt_ids"]),
                "response": tokenizer.decode(response, skip_special_tokens=True),
                "response_ids": response,
                "logprobs": generations["rollout_logprobs"][i][mask[i]].tolist()
                if "rollout_logprobs" in generations
                else None,
                "failure": failures[i] if failures is not None else None,
            }
            line |= {key: scored[key][i] for key in fields}
            file.write(json.dumps(line, default=str) + "\n")


def print_table(metrics: dict[str, float], confidence: float) -> None:
    """The metrics as a table on the console: one row per metric, its value and its interval."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rlmesh eval")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column(f"{confidence:.0%} interval", justify="right")
    for key, value in metrics.items():
        if key.endswith(("/ci_low", "/ci_high")):
            continue
        low, high = metrics.get(f"{key}/ci_low"), metrics.get(f"{key}/ci_high")
        interval = f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else "-"
        table.add_row(key, f"{value:.4f}", interval)
    Console().print(table)


if __name__ == "__main__":
    main()
