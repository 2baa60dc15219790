"""run_episode with scripted turns: tool calls, environment steps, limits and failures, and the mask invariant (the
engine is given exactly the buffer, and mask 1 marks exactly the sampled tokens)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from rlmesh.envs import ChatTurns, EpisodeLimits, run_episode, tool_schemas
from tests.unit.envs.chat_tokenizers import THINKING_TEMPLATE, byte_tokenizer


@dataclass
class Turn:
    response_ids: list[int]
    logprobs: list[float]
    weight_version: int = 0
    last_weight_version: int | None = None
    finish_reason: str = "stop"


class Calculator:
    """Multiply with a tool, then answer."""

    def reset(self, row: dict[str, Any]) -> str:
        self.answer = row["a"] * row["b"]
        return f"What is {row['a']}*{row['b']}?"

    def step(self, action: str) -> tuple[str | None, float, bool, dict[str, Any]]:
        return None, float(str(self.answer) in action), True, {"answered": action}

    def multiply(self, a: int, b: int) -> int:
        """Multiplies two integers.

        Args:
            a: the first factor
            b: the second factor
        """
        return a * b

    def broken(self) -> str:
        """Always raises."""
        raise RuntimeError("out of order")

    def slow(self) -> str:
        """Takes too long."""
        time.sleep(1.0)
        return "late"


class Scripted:
    """A stand-in engine that answers with the given texts in turn and records every context it was given."""

    def __init__(self, tokenizer: Any, texts: list[str], finish_reasons: list[str] | None = None) -> None:
        self.tokenizer, self.texts, self.contexts = tokenizer, list(texts), []
        self.seconds = 0.0
        self.finish_reasons = finish_reasons or ["stop"] * len(texts)

    async def __call__(self, context: list[int], max_tokens: int) -> Turn:
        self.contexts.append(list(context))
        index = len(self.contexts) - 1
        ids = list(self.tokenizer.encode(self.texts[index], add_special_tokens=False))[:max_tokens]
        if self.finish_reasons[index] == "stop":
            ids.append(self.tokenizer.eos_token_id)
        logprobs = [-0.1 * (index + 1)] * len(ids)
        return Turn(ids, logprobs, weight_version=index, finish_reason=self.finish_reasons[index])


def play(env: Any, texts: list[str], limits: EpisodeLimits | None = None, template: str | None = None, **kw: Any):
    tokenizer = byte_tokenizer(template) if template else byte_tokenizer()
    engine = Scripted(tokenizer, texts, **kw)
    turns = ChatTurns(tokenizer, tool_schemas(env))

    async def timed() -> Any:
        started = time.monotonic()
        episode = await run_episode(env, {"a": 12, "b": 7}, engine, turns, limits or EpisodeLimits())
        engine.seconds = time.monotonic() - started  # asyncio.run then waits for a hung tool's thread to return
        return episode

    return asyncio.run(timed()), engine


def assert_invariant(piece: Any, contexts: list[list[int]], turns: list[Turn] | None = None) -> None:
    """Each context the engine got is the buffer as it stood; mask 1 exactly where a sampled turn's tokens sit."""
    full = piece.context_ids
    for context in contexts:
        assert full[: len(context)] == context
    sampled = [i for i, m in enumerate(piece.response_mask) if m == 1]
    offsets = [len(c) - len(piece.prompt_ids) for c in contexts]
    expected = []
    for k, start in enumerate(offsets):
        end = offsets[k + 1] if k + 1 < len(offsets) else len(piece.response_ids)
        # a turn's sampled tokens start where its context ends and run up to the next turn's appended tokens
        expected += [i for i in range(start, end) if piece.response_mask[i] == 1]
    assert sampled == expected and piece.response_mask[-1] == 1
    assert all(lp == 0.0 for lp, m in zip(piece.logprobs, piece.response_mask, strict=True) if m == 0)
    assert all(lp != 0.0 for lp, m in zip(piece.logprobs, piece.response_mask, strict=True) if m == 1)


def test_a_tool_call_then_an_answer_is_one_sample_whose_tool_tokens_are_masked():
    call = '<tool_call>{"name": "multiply", "arguments": {"a": 12, "b": 7}}</tool_call>'
    episode, engine = play(Calculator(), [call, "It is 84."])
    assert (episode.num_turns, episode.tool_calls, episode.tool_errors, episode.reward) == (2, 1, 0, 1.0)
    assert episode.ended_by == "done" and episode.info == {"answered": "It is 84."}
    (piece,) = episode.pieces
    assert_invariant(piece, engine.contexts)
    tokenizer = engine.tokenizer
    appended = [t for t, m in zip(piece.response_ids, piece.response_mask, strict=True) if m == 0]
    assert "<tool_response>\n84\n</tool_response>" in tokenizer.decode(appended)  # the tool's result, verbatim
    assert piece.sampled_tokens == len(tokenizer.encode(call)) + len(tokenizer.encode("It is 84.")) + 2
    assert (piece.first_version, piece.last_version) == (0, 1)
    assert "multiply" in tokenizer.decode(piece.prompt_ids).split("<|im_end|>")[0]  # the schemas reached the template


def test_a_raising_and_a_hanging_tool_become_error_observations_and_the_episode_goes_on():
    texts = ['<tool_call>{"name": "broken", "arguments": {}}</tool_call>', '<tool_call>{"name": "slow"}</tool_call>']
    episode, engine = play(Calculator(), [*texts, "84"], EpisodeLimits(tool_timeout_s=0.1))
    assert engine.seconds < 0.9  # the hanging tool cost its time limit, not its second
    assert (episode.tool_calls, episode.tool_errors, episode.tool_timeouts) == (2, 1, 1)
    assert episode.num_turns == 3 and episode.reward == 1.0
    assert "raised RuntimeError: out of order" in episode.messages[2]["content"]
    assert "did not answer within 0.1 s" in episode.messages[4]["content"]
    assert_invariant(episode.pieces[0], engine.contexts)


class Endless(Calculator):
    def step(self, action: str) -> tuple[str | None, float, bool, dict[str, Any]]:
        return "Try again.", 0.0, False, {}


def test_max_turns_ends_on_a_sampled_token_and_no_observation_is_appended_after_the_last_turn():
    episode, engine = play(Endless(), ["1", "2", "3"], EpisodeLimits(max_turns=3))
    assert episode.ended_by == "max_turns" and episode.num_turns == 3 and episode.reward == 0.0
    assert_invariant(episode.pieces[0], engine.contexts)


def test_the_token_budget_and_a_turn_cut_at_its_cap_end_the_episode():
    episode, _ = play(Endless(), ["1" * 40], EpisodeLimits(max_tokens_per_turn=8), finish_reasons=["length"])
    assert episode.ended_by == "length" and episode.pieces[0].sampled_tokens == 8
    schemas = tool_schemas(Endless())
    prompt = len(ChatTurns(byte_tokenizer(), schemas).prompt_ids([{"role": "user", "content": "What is 12*7?"}]))
    # The first turn fits; the "Try again." turn appended after it leaves no room for a second.
    episode, engine = play(Endless(), ["1" * 10, "2"], EpisodeLimits(max_total_tokens=prompt + 30, max_turns=9))
    assert episode.ended_by == "max_total_tokens" and episode.num_turns == 1
    assert len(engine.contexts) == 1
    assert_invariant(episode.pieces[0], engine.contexts)  # it ends on the sampled turn, "Try again." left out


class Chatty(Calculator):
    """Answers with a new user message, which Qwen3's template treats as a new query."""

    def step(self, action: str) -> tuple[str | None, float, bool, dict[str, Any]]:
        done = "84" in action
        return (None if done else "Higher."), float(done), done, {}


def test_a_template_that_rewrites_history_splits_the_episode_into_samples_that_each_keep_the_invariant():
    texts = ["<think>small</think>50", "84"]
    episode, engine = play(Chatty(), texts, template=THINKING_TEMPLATE)
    assert len(episode.pieces) == 2 and episode.reward == 1.0
    first, second = episode.pieces
    assert_invariant(first, engine.contexts[:1])
    assert_invariant(second, engine.contexts[1:])
    decoded = engine.tokenizer.decode(second.prompt_ids)
    assert "<think>" not in decoded and "50" in decoded and "Higher." in decoded  # the template's own rendering


class Fragile(Calculator):
    def step(self, action: str) -> Any:
        raise ValueError("cannot parse the answer")


class Stuck(Calculator):
    async def step(self, action: str) -> Any:
        await asyncio.sleep(10)


def test_an_environment_that_raises_or_hangs_ends_its_episode_with_the_error_and_keeps_its_tokens():
    episode, engine = play(Fragile(), ["84"])
    assert episode.ended_by == "env_error" and "raised ValueError: cannot parse the answer" in str(episode.error)
    assert_invariant(episode.pieces[0], engine.contexts)
    episode, _ = play(Stuck(), ["84"], EpisodeLimits(tool_timeout_s=0.05))
    assert episode.ended_by == "env_error" and "did not return within 0.05 s" in str(episode.error)


class Wordle:
    """A TRL environment_factory-style class, as a TRL user writes one: reset(**row) and public methods as tools."""

    def reset(self, **kwargs: Any) -> str:
        self.secret, self.guesses = kwargs["secret"], []
        return " (5 letters)"

    def guess(self, word: str) -> str:
        """Guess the word.

        Args:
            word: a five-letter word
        """
        self.guesses.append(word)
        return "correct" if word == self.secret else "wrong"


def test_a_trl_environment_factory_class_runs_its_public_methods_as_tools():
    from rlmesh.envs import TRLEnvironment

    env = TRLEnvironment(Wordle)
    assert [s["function"]["name"] for s in tool_schemas(env)] == ["guess"]
    tokenizer = byte_tokenizer()
    engine = Scripted(tokenizer, ['<tool_call>{"name": "guess", "arguments": {"word": "crane"}}</tool_call>', "Done."])
    row = {"prompt": [{"role": "user", "content": "Find the word"}], "secret": "crane"}
    episode = asyncio.run(run_episode(env, row, engine, ChatTurns(tokenizer, tool_schemas(env)), EpisodeLimits()))
    assert episode.messages[0] == {"role": "user", "content": "Find the word (5 letters)"}
    assert episode.messages[2]["content"] == "correct" and env.inner.guesses == ["crane"]
    assert episode.ended_by == "done" and episode.reward is None  # the run's reward function scores it
    assert_invariant(episode.pieces[0], engine.contexts)


def test_episode_metrics_count_turns_tool_calls_and_how_episodes_ended():
    from rlmesh.envs import Episode, TokenTrajectory, episode_metrics

    one = Episode([TokenTrajectory([1])], [], num_turns=3, tool_calls=2, tool_errors=1, ended_by="done")
    two = Episode([TokenTrajectory([1]), TokenTrajectory([2])], [], num_turns=1, tool_timeouts=1, ended_by="max_turns")
    three = Episode([], [], num_turns=0, ended_by="env_error", error="reset raised")
    metrics = episode_metrics([one, two, three])
    assert metrics["num_turns/mean"] == 4 / 3 and metrics["num_turns/max"] == 3 and metrics["num_turns/min"] == 0
    assert (metrics["tool_calls/count"], metrics["tool_calls/errors"], metrics["tool_calls/timeouts"]) == (2, 1, 1)
    assert metrics["episodes/split"] == 1 and metrics["episodes/env_errors"] == 1
    assert metrics["episodes/ended_by/done"] == 1 / 3 and metrics["episodes/ended_by/max_turns"] == 1 / 3
    assert episode_metrics([]) == {}
