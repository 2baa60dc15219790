"""A multi-turn trajectory as an append-only token buffer, and the chat template's tokens between two turns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class HistoryRewritten(Exception):
    """The chat template renders the conversation so far differently once the next messages follow it (Qwen3-style
    templates drop earlier <think> blocks): appending to the buffer would train on a context the template never
    shows. The trajectory splits here instead."""


@dataclass
class TokenTrajectory:
    """One training sample of a trajectory: the prompt, then every later token exactly as the engine saw or sampled
    it. Sampled tokens have mask 1 and their rollout log-probs; environment and tool tokens mask 0 and log-prob 0.
    Nothing in it is ever re-tokenized."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    first_version: int | None = None  # the weight version of its first sampled token
    last_version: int | None = None  # and of its last

    @property
    def context_ids(self) -> list[int]:
        """What the engine is given for the next turn: every token so far."""
        return [*self.prompt_ids, *self.response_ids]

    @property
    def sampled_tokens(self) -> int:
        return sum(self.response_mask)

    def append_sampled(self, ids: Sequence[int], logprobs: Sequence[float], first: int, last: int) -> None:
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} sampled tokens with {len(logprobs)} log-probs")
        self.response_ids += ids
        self.response_mask += [1] * len(ids)
        self.logprobs += [float(lp) for lp in logprobs]
        self.first_version = first if self.first_version is None else self.first_version
        self.last_version = last

    def append_context(self, ids: Sequence[int]) -> None:
        self.response_ids += ids
        self.response_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)


class ChatTurns:
    """The tokens a chat template puts between turns, for one tokenizer and tool set. The buffer keeps the sampled
    tokens as sampled; only the template's own text (the end of the model's turn, the next messages, the next
    generation prompt) is rendered and tokenized, and only once, when it is appended."""

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]] | None = None) -> None:
        self.tokenizer = tokenizer
        self.tools = tools or None

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages, tools=self.tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The first prompt (or the prompt of a sample split off): the conversation and the generation prompt."""
        return self.encode(self.render(messages, generation_prompt=True))

    def continuation_ids(
        self, messages: list[dict[str, Any]], new_messages: list[dict[str, Any]], last_sampled: int
    ) -> list[int]:
        """The tokens after the model's last sampled token (`last_sampled`, its end-of-turn token) up to the next
        generation prompt: the rest of the template's closing of that turn, the new messages, the prompt.
        `messages` ends with the model's turn. Raises HistoryRewritten when the template renders `messages`
        differently once `new_messages` follow."""
        before = self.render(messages, generation_prompt=False)
        after = self.render([*messages, *new_messages], generation_prompt=True)
        if not after.startswith(before):
            raise HistoryRewritten(f"the chat template rewrites the conversation once {len(new_messages)} more follow")
        # The end of the model's turn as the template writes it, after the token that ended the sampling (for
        # Qwen's template the newline after <|im_end|>): found in the render, since no sampled token is re-encoded.
        end = self.tokenizer.decode([last_sampled])
        closing = before[before.rindex(end) + len(end) :] if end and end in before else ""
        return self.encode(closing + after[len(before) :])
