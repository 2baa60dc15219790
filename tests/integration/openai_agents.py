"""Black-box agents written against the OpenAI client, for the endpoint tests (importable by Ray workers)."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai

from rlmesh.envs import parse_tool_calls
from rlmesh.envs.calculator import evaluate_integer_expression


def client_for(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


class TwoTurnChatAgent:
    """Asks, shows the model a tool result of its own making, asks again, then reports a reward; writes what the API
    returned (ids and log-probs) to the row's record_dir for the test to compare."""

    def run(self, base_url: str, row: dict[str, Any]) -> None:
        client = client_for(base_url)
        messages: list[dict[str, Any]] = [dict(m) for m in row["prompt"]]
        seen = []
        for _ in range(2):
            completion = client.chat.completions.create(model="policy", messages=messages, max_tokens=12, logprobs=True)
            choice = completion.choices[0]
            assert choice.logprobs is not None and choice.logprobs.content is not None
            seen.append(
                {
                    "prompt_token_ids": (completion.model_extra or {})["prompt_token_ids"],
                    "token_ids": (choice.model_extra or {})["token_ids"],
                    "logprobs": [entry.logprob for entry in choice.logprobs.content],
                }
            )
            messages += [{"role": "assistant", "content": choice.message.content}, {"role": "tool", "content": "7"}]
        httpx.post(f"{base_url}/rlmesh/reward", json={"reward": 0.5}, timeout=30).raise_for_status()
        (Path(row["extra_info"]["record_dir"]) / f"{uuid.uuid4().hex}.json").write_text(json.dumps(seen))


class TwoTurnCompletionAgent:
    """The same on /v1/completions: the second prompt is the first, the reply's token ids and a tool result's text
    tokens, as token ids; a third starts over from the first prompt, which does not extend the session."""

    def run(self, base_url: str, row: dict[str, Any]) -> float:
        client = client_for(base_url)
        first: list[int] = list(row["extra_info"]["prompt_ids"])
        prompt = first
        for _ in range(2):
            completion = client.completions.create(model="policy", prompt=prompt, max_tokens=12)
            prompt = [*prompt, *(completion.choices[0].model_extra or {})["token_ids"], *row["extra_info"]["tool_ids"]]
        client.completions.create(model="policy", prompt=first, max_tokens=12)
        return 1.0


class CalculatorAgent:
    """The calculator task as agent code would write it: call the model, run its tool calls, answer."""

    def run(self, base_url: str, row: dict[str, Any]) -> float:
        client = client_for(base_url)
        messages: list[dict[str, Any]] = [dict(m) for m in row["prompt"]]
        reply = ""
        for _ in range(3):
            reply = client.chat.completions.create(model="policy", messages=messages).choices[0].message.content or ""
            messages.append({"role": "assistant", "content": reply})
            calls = parse_tool_calls(reply)
            if not calls:
                break
            try:
                result = str(evaluate_integer_expression(str(calls[0].arguments.get("expression", ""))))
            except Exception as err:
                result = f"Error: {err}"
            messages.append({"role": "tool", "content": result})
        answer = re.findall(r"-?\d+", reply)
        return float(bool(answer) and answer[-1] == str(row["ground_truth"]))
