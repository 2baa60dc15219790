"""trainer.dump_rollouts: a step's samples as step_N.pt (what trainer.replay_rollouts reads) and step_N.html (decoded
text, the loss mask, the reward and the rollout-vs-trainer log-prob gap of every sample), written atomically."""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch

from rlmesh.data import Batch

STEP_FILE = "step_{step:06d}.{ext}"
PAGE_SAMPLES = 512  # the page shows this many of a step's samples (a page of every token of a big step is too big)


def dump_step(
    batch: Batch,
    trainer_logprobs: Batch | None,
    folder: str,
    step: int,
    seed_of: Callable[[int, int], int],
    tokenizer_path: str,
) -> tuple[list[Any], dict[str, str]]:
    """Write step `step`'s batch (after rewards and advantages, before the update) to `folder`. Per prompt group:
    its request seed (`seed_of(issued step, prompt index)`), prompt ids and samples (response ids, rollout log-probs,
    weight versions): what a replay answers that request with. Per sample: the score, the advantage, the response
    mask and the trainer's log-probs of its tokens (`trainer_logprobs`, else the batch's recomputed old log-probs).
    Run in the store worker; returns the files written."""
    mask = batch["response_mask"]
    lengths = (batch["attention_mask"][:, batch["prompt_ids"].shape[1] :]).sum(dim=1).tolist()
    prompt_width = batch["prompt_ids"].shape[1]
    trainer = (trainer_logprobs if trainer_logprobs is not None else batch)["old_logprobs"]
    uids = list(batch["uid"])
    groups: dict[str, list[int]] = {}
    for row, uid in enumerate(uids):
        groups.setdefault(uid, []).append(row)
    seeds, prompts, samples = [], [], []
    for uid, rows in groups.items():
        issued, index = (int(part) for part in uid.split("/"))
        seeds.append(seed_of(issued, index))
        prompt = batch["prompt_ids"][rows[0]][batch["attention_mask"][rows[0], :prompt_width].bool()]
        prompts.append(prompt.tolist())
        samples.append(
            [
                {
                    "response_ids": batch["response_ids"][row, : lengths[row]].tolist(),
                    "logprobs": batch["rollout_logprobs"][row, : lengths[row]].tolist(),
                    "weight_version": int(batch["weight_version"][row]),
                    "last_weight_version": batch["last_weight_version"][row],
                }
                for row in rows
            ]
        )
    scores = [float(s) for s in batch["score"]] if "score" in batch else [float("nan")] * len(batch)
    payload = {
        "step": step,
        "seed": seeds,
        "prompt_ids": prompts,
        "samples": samples,
        "uid": uids,
        "score": scores,
        "advantage": [float(a) for a in batch["advantages"][:, 0]] if "advantages" in batch else [],
        "response_mask": [mask[row, : lengths[row]].tolist() for row in range(len(batch))],
        "trainer_logprobs": [trainer[row, : lengths[row]].tolist() for row in range(len(batch))],
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / STEP_FILE.format(step=step, ext="pt")
    page = out / STEP_FILE.format(step=step, ext="html")
    _atomic(data_file, lambda f: torch.save(payload, f))
    text = step_page(payload, tokenizer_path)
    _atomic(page, lambda f: f.write(text.encode()))
    return [], {"data": str(data_file), "page": str(page)}


def _atomic(path: Path, write: Callable[[Any], Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@cache
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def step_page(payload: dict[str, Any], tokenizer_path: str) -> str:
    """The HTML of one dumped step: a row per sample with its prompt, its response token by token (masked-out
    tokens struck through, each token's rollout and trainer log-probs on hover, shaded by their gap), its score,
    advantage, weight versions and largest gap."""
    tokenizer = _tokenizer(tokenizer_path)
    rows = []
    flat = [(g, s) for g, group in enumerate(payload["samples"]) for s in range(len(group))]
    for row, (group, index) in enumerate(flat[:PAGE_SAMPLES]):
        sample = payload["samples"][group][index]
        trainer = payload["trainer_logprobs"][row]
        gaps = [t - r for t, r in zip(trainer, sample["logprobs"], strict=True)]
        cells = []
        for token, mask, rollout_lp, trainer_lp, gap in zip(
            sample["response_ids"], payload["response_mask"][row], sample["logprobs"], trainer, gaps, strict=True
        ):
            shade = min(1.0, abs(gap) * 10)
            style = f"background: rgba(255,0,0,{shade:.2f})" + ("" if mask else "; text-decoration: line-through")
            title = f"id {token} · rollout {rollout_lp:.4f} · trainer {trainer_lp:.4f} · gap {gap:+.4f}"
            text = html.escape(tokenizer.decode([token]))
            cells.append(f'<span class="tok" style="{style}" title="{title}">{text}</span>')
        versions = f"{sample['weight_version']}-{sample['last_weight_version'] or sample['weight_version']}"
        advantage = payload["advantage"][row] if payload["advantage"] else float("nan")
        worst = max((abs(g) for g in gaps), default=0.0)
        prompt = html.escape(tokenizer.decode(payload["prompt_ids"][group]))
        rows.append(
            f"<tr><td>{html.escape(payload['uid'][row])}#{index}</td><td>{payload['score'][row]:.3f}</td>"
            f"<td>{advantage:+.3f}</td><td>{versions}</td><td>{worst:.2e}</td>"
            f"<td class='text'>{prompt}</td><td class='text'>{''.join(cells)}</td></tr>"
        )
    head = (
        "<tr><th>sample</th><th>score</th><th>advantage</th><th>versions</th><th>max |gap|</th>"
        "<th>prompt</th><th>response (hover: log-probs; red: trainer-rollout gap; struck: masked out)</th></tr>"
    )
    style = (
        "body{font-family:sans-serif} table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px;"
        "vertical-align:top} .text{font-family:monospace;white-space:pre-wrap} .tok{border-right:1px dotted #ddd}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>rlmesh step {payload['step']}</title>"
        f"<style>{style}</style></head><body><h1>step {payload['step']}: {len(flat)} samples</h1>"
        + (f"<p>The first {PAGE_SAMPLES} are shown; step_N.pt holds all.</p>" if len(flat) > PAGE_SAMPLES else "")
        + f"<table>{head}{''.join(rows)}</table></body></html>\n"
    )
