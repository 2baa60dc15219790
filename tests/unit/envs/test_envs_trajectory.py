"""The token buffer of a multi-turn trajectory: sampled tokens kept as sampled (mask 1, their log-probs), the
template's text between turns appended once (mask 0), and a template that rewrites history detected."""

from __future__ import annotations

import pytest

from rlmesh.envs import ChatTurns, HistoryRewritten, TokenTrajectory
from tests.unit.envs.chat_tokenizers import THINKING_TEMPLATE, byte_tokenizer

TOOLS = [{"type": "function", "function": {"name": "multiply", "parameters": {"type": "object", "properties": {}}}}]


def sampled_turn(tokenizer, text: str) -> list[int]:
    """A turn as an engine returns it: its tokens, ending with the end-of-turn token it stopped on."""
    return [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]


def test_a_tool_turn_appends_the_templates_tokens_verbatim_and_masks_exactly_the_sampled_ones():
    tokenizer = byte_tokenizer()
    turns = ChatTurns(tokenizer, TOOLS)
    messages = [{"role": "user", "content": "What is 12*7?"}]
    trajectory = TokenTrajectory(turns.prompt_ids(messages))
    call = '<tool_call>{"name": "multiply", "arguments": {"a": 12, "b": 7}}</tool_call>'
    first = sampled_turn(tokenizer, call)
    trajectory.append_sampled(first, [-0.5] * len(first), first=3, last=3)
    messages.append({"role": "assistant", "content": call})
    tool = [{"role": "tool", "content": "84"}]
    glue = turns.continuation_ids(messages, tool, last_sampled=first[-1])
    trajectory.append_context(glue)
    messages += tool
    second = sampled_turn(tokenizer, "The answer is 84.")
    trajectory.append_sampled(second, [-0.25] * len(second), first=3, last=4)

    # The buffer is the conversation as the template writes it, and every sampled token is where it was sampled.
    rendered = turns.render([*messages, {"role": "assistant", "content": "The answer is 84."}], False)
    assert tokenizer.decode(trajectory.context_ids) == rendered.removesuffix("\n")  # the engine stopped at im_end
    assert trajectory.response_ids == [*first, *glue, *second]
    assert trajectory.response_mask == [1] * len(first) + [0] * len(glue) + [1] * len(second)
    assert trajectory.logprobs == [-0.5] * len(first) + [0.0] * len(glue) + [-0.25] * len(second)
    assert (trajectory.first_version, trajectory.last_version) == (3, 4)
    assert trajectory.sampled_tokens == len(first) + len(second)
    # What lies between the turns: the newline closing the model's turn, the tool's message, the next prompt.
    assert tokenizer.decode(glue) == "\n<|im_start|>user\n<tool_response>\n84\n</tool_response><|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )


def test_a_template_that_drops_earlier_thinking_is_detected_before_a_new_user_message_not_a_tool_result():
    tokenizer = byte_tokenizer(THINKING_TEMPLATE)
    turns = ChatTurns(tokenizer)
    messages = [
        {"role": "user", "content": "Guess my number."},
        {"role": "assistant", "content": "<think>between 1 and 10</think>5"},
    ]
    last = tokenizer.eos_token_id
    # A tool result is not a new user query: the thinking stays, and the buffer can go on.
    turns.continuation_ids(messages, [{"role": "tool", "content": "higher"}], last_sampled=last)
    # A new user message makes the template drop the thinking from the turn before: the trajectory must split.
    with pytest.raises(HistoryRewritten):
        turns.continuation_ids(messages, [{"role": "user", "content": "Higher."}], last_sampled=last)


def test_sampled_tokens_need_one_log_prob_each():
    with pytest.raises(ValueError, match="3 sampled tokens with 2 log-probs"):
        TokenTrajectory([1]).append_sampled([1, 2, 3], [0.0, 0.0], first=0, last=0)
