"""Environments' tools: schemas from type hints and docstrings, tool calls read from text, and running them with a
time limit, where a raising, hanging or unknown tool becomes an error the model reads."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from rlmesh.envs import StepResult, ToolCall, as_step_result, parse_tool_calls, run_tool, tool_methods, tool_schemas


class Shop:
    """An environment written as a user would: plain methods, no base class."""

    def __init__(self) -> None:
        self.prices = {"apple": 3, "pear": 5}

    def reset(self, row: dict[str, Any]) -> str:
        return f"Buy {row['item']}"

    def step(self, action: str) -> tuple[str | None, float, bool, dict[str, Any]]:
        return None, float("7" in action), True, {}

    def price(self, item: str) -> int:
        """The price of one item.

        Args:
            item: the item's name, e.g. "apple"
        """
        if item not in self.prices:
            raise KeyError(f"no {item} in the shop")
        return self.prices[item]

    async def wait(self, seconds: float) -> str:
        """Waits, then says so.

        Args:
            seconds: how long
        """
        await asyncio.sleep(seconds)
        return "waited"

    def stall(self) -> str:
        """Never answers in time."""
        time.sleep(0.5)
        return "late"

    def _helper(self) -> None:  # private: not a tool
        pass


def test_public_methods_other_than_reset_and_step_are_the_tools_with_schemas_from_hints_and_docstrings():
    env = Shop()
    assert sorted(tool_methods(env)) == ["price", "stall", "wait"]
    (price,) = [s for s in tool_schemas(env) if s["function"]["name"] == "price"]
    assert price["function"]["description"] == "The price of one item."
    assert price["function"]["parameters"]["properties"]["item"] == {
        "type": "string",
        "description": 'the item\'s name, e.g. "apple"',
    }
    assert price["function"]["parameters"]["required"] == ["item"]


def test_a_tool_without_type_hints_is_named_with_the_fix():
    class Sloppy:
        def reset(self, row: Any) -> str:
            return ""

        def step(self, action: str) -> Any:
            return None

        def lookup(self, key):  # type: ignore[no-untyped-def]
            return key

    with pytest.raises(ValueError, match=r"tool Sloppy\.lookup has no schema .* type hint"):
        tool_schemas(Sloppy())


def test_tool_calls_are_read_in_order_and_unreadable_ones_carry_their_error():
    text = (
        'Let me check.<tool_call>\n{"name": "price", "arguments": {"item": "apple"}}\n</tool_call>'
        '<tool_call>{"name": "price", "arguments": "{\\"item\\": \\"pear\\"}"}</tool_call>'
        "<tool_call>{price: apple}</tool_call><tool_call>[1, 2]</tool_call>"
    )
    calls = parse_tool_calls(text)
    assert calls[:2] == [ToolCall("price", {"item": "apple"}), ToolCall("price", {"item": "pear"})]
    assert calls[2].error is not None and "not valid JSON" in calls[2].error
    assert calls[3].error is not None and '{"name"' in calls[3].error
    assert parse_tool_calls("The answer is 7.") == []


def test_running_tools_turns_every_failure_into_text_and_a_status():
    tools = tool_methods(Shop())

    def outcome(name: str, timeout_s: float = 1.0, **arguments: Any) -> tuple[str, str]:
        result = asyncio.run(run_tool(tools, ToolCall(name, arguments), timeout_s))
        return result.status, result.text

    assert outcome("price", item="pear") == ("ok", "5")
    status, text = outcome("price", item="kiwi")
    assert status == "error" and "raised KeyError" in text and "no kiwi" in text
    status, text = outcome("price", colour="red")
    assert status == "error" and "wrong arguments for price" in text
    status, text = outcome("refund")
    assert status == "error" and "unknown tool 'refund'" in text and "'price'" in text
    started = time.monotonic()
    assert outcome("wait", timeout_s=0.05, seconds=10) == ("timeout", "Error: wait did not answer within 0.05 s")
    assert outcome("stall", timeout_s=0.05)[0] == "timeout"
    assert time.monotonic() - started < 2.0  # neither the async nor the sync tool held the caller
    assert asyncio.run(run_tool(tools, ToolCall("", {}, "bad JSON"), 1.0)).status == "error"


def test_step_may_return_gym_tuples_or_a_step_result():
    assert as_step_result(Shop().step("7")) == StepResult(None, 1.0, True, {})
    assert as_step_result(StepResult("more", None, False)).observation == "more"
    with pytest.raises(TypeError, match="StepResult or"):
        as_step_result("done")


def test_each_tool_run_is_a_span_of_the_trace_with_its_outcome():
    from rlmesh import spans

    tools = tool_methods(Shop())
    spans.drain()
    asyncio.run(run_tool(tools, ToolCall("price", {"item": "pear"}), 1.0))
    asyncio.run(run_tool(tools, ToolCall("price", {"item": "kiwi"}), 1.0))
    asyncio.run(run_tool(tools, ToolCall("wait", {"seconds": 10}), 0.05))
    recorded = spans.drain()
    assert [(s["name"], s["args"]) for s in recorded] == [
        ("tool", {"tool": "price"}),
        ("tool", {"tool": "price", "outcome": "error"}),
        ("tool", {"tool": "wait", "outcome": "timeout"}),
    ]
    assert all(s["end_ns"] >= s["start_ns"] for s in recorded)
    assert recorded[2]["end_ns"] - recorded[2]["start_ns"] >= 0.04e9
