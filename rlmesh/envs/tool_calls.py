"""Tool calls in the model's text (the Hermes / Qwen <tool_call> JSON format), and running one with a time limit."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rlmesh.spans import span

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    error: str | None = None  # the call could not be read: it runs nothing, and the model is told why


@dataclass(frozen=True)
class ToolOutcome:
    text: str  # what the model reads back: the tool's result, or what went wrong
    status: str  # ok | error | timeout


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every <tool_call>{"name": ..., "arguments": {...}}</tool_call> block in `text`, in order. A block that is not
    such a JSON object is returned with its error, so that it costs the turn, not the trajectory. The JSON is only
    parsed, never evaluated."""
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            payload = json.loads(block)
        except json.JSONDecodeError as err:
            calls.append(ToolCall("", {}, f"the tool call is not valid JSON ({err.msg} at {err.pos})"))
            continue
        name = payload.get("name") if isinstance(payload, dict) else None
        arguments = payload.get("arguments", {}) if isinstance(payload, dict) else None
        if isinstance(arguments, str):  # some models send the arguments JSON-encoded
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(name, str) or not isinstance(arguments, dict):
            calls.append(ToolCall(str(name or ""), {}, 'a tool call is {"name": "...", "arguments": {...}}'))
            continue
        calls.append(ToolCall(name, arguments))
    return calls


async def run_tool(tools: Mapping[str, Callable[..., Any]], call: ToolCall, timeout_s: float) -> ToolOutcome:
    """Run one call of one of `tools`, sync or async, for at most `timeout_s`. Whatever goes wrong (an unreadable
    call, an unknown tool, wrong arguments, an exception, the time limit) becomes the text the model reads back and
    an error or timeout status; nothing propagates. A sync tool that hangs keeps its worker thread until it returns:
    Python cannot stop a thread, so hanging sync tools belong in a process of their own."""
    if call.error is not None:
        return ToolOutcome(f"Error: {call.error}", "error")
    tool = tools.get(call.name)
    if tool is None:
        return ToolOutcome(f"Error: unknown tool {call.name!r}; the tools are {sorted(tools)}", "error")
    try:
        inspect.signature(tool).bind(**call.arguments)
    except TypeError as err:
        return ToolOutcome(f"Error: wrong arguments for {call.name}: {err}", "error")
    with span("tool", tool=call.name) as traced:
        try:
            if inspect.iscoroutinefunction(tool):
                result = await asyncio.wait_for(tool(**call.arguments), timeout_s)
            else:
                result = await asyncio.wait_for(asyncio.to_thread(tool, **call.arguments), timeout_s)
        except TimeoutError:
            traced["outcome"] = "timeout"
            return ToolOutcome(f"Error: {call.name} did not answer within {timeout_s:g} s", "timeout")
        except Exception as err:
            traced["outcome"] = "error"
            return ToolOutcome(f"Error: {call.name} raised {type(err).__name__}: {err}", "error")
    return ToolOutcome(result if isinstance(result, str) else json.dumps(result, default=str), "ok")
