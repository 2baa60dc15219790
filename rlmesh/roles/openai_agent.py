"""Black-box agents on an OpenAI-compatible endpoint: each agent-loop actor serves /v1/chat/completions and
/v1/completions on 127.0.0.1, and records every request of a session into that session's token trajectory."""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from rlmesh.config import AgentConfig, SamplingConfig
from rlmesh.envs import ChatTurns, Episode, HistoryRewritten, TokenTrajectory
from rlmesh.mesh import ActorMesh, endpoint
from rlmesh.roles.agent_loop import environment_factory, episode_row, group_samples
from rlmesh.roles.rollout.base import Sample, sampling_seed

SESSION_HEADER = "X-Session-Id"


class OpenAIAgent(Protocol):
    """A black-box agent, one instance per episode: run(base_url, row) plays the episode with any OpenAI client
    pointed at base_url (its session is in the URL, so no header is needed), and returns the episode's reward, or
    None to leave it to the reward role (or to a POST of {"reward": r} to base_url + "/rlmesh/reward"). Sync (run in
    a worker thread) or async."""

    def run(self, base_url: str, row: Mapping[str, Any]) -> float | None: ...


class EndpointError(Exception):
    """A request the endpoint refuses: answered with its status and message as OpenAI's error JSON."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Session:
    """One episode's requests: the token trajectory they make, token-exact. A chat request that continues the
    conversation the session already holds (its earlier messages and the replies as returned) appends only the new
    messages' tokens; anything else (another history, a rewritten one) starts a new piece."""

    key: str
    seed: int | None
    sampling: SamplingConfig  # the run's, for this episode's group: train or validation
    episode: Episode = field(default_factory=lambda: Episode(pieces=[], messages=[]))
    messages: list[tuple[str, str]] | None = None  # (role, content) of the conversation so far, with the replies
    last_sampled: int | None = None
    closed: bool = False

    @property
    def piece(self) -> TokenTrajectory | None:
        return self.episode.pieces[-1] if self.episode.pieces else None

    def chat_context(self, turns: ChatTurns, messages: list[dict[str, Any]]) -> list[int]:
        seen = [(str(m.get("role")), str(m.get("content") or "")) for m in messages]
        held = self.messages
        if self.piece is not None and held is not None and seen[: len(held)] == held and len(seen) > len(held):
            earlier = [{"role": role, "content": content} for role, content in held]
            try:
                assert self.last_sampled is not None
                self.piece.append_context(turns.continuation_ids(earlier, messages[len(held) :], self.last_sampled))
                return self.piece.context_ids
            except HistoryRewritten:
                pass
        return self.new_piece(turns.prompt_ids(messages))

    def completion_context(self, prompt_ids: list[int]) -> list[int]:
        piece = self.piece
        if piece is not None and prompt_ids[: len(piece.context_ids)] == piece.context_ids:
            piece.append_context(prompt_ids[len(piece.context_ids) :])
            return piece.context_ids
        return self.new_piece(prompt_ids)

    def new_piece(self, prompt_ids: list[int]) -> list[int]:
        self.episode.pieces.append(TokenTrajectory(list(prompt_ids)))
        return list(prompt_ids)

    def record(self, sample: Sample) -> None:
        piece = self.piece
        assert piece is not None
        last = sample.last_weight_version if sample.last_weight_version is not None else sample.weight_version
        piece.append_sampled(sample.response_ids, sample.logprobs, sample.weight_version, last)
        self.episode.num_turns += 1
        if sample.response_ids:
            self.last_sampled = sample.response_ids[-1]


class OpenAIAgentLoop:
    """Plays each group's episodes with a black-box agent (roles.agent.environment: a class with run(base_url,
    row), the OpenAIAgent contract) against this actor's OpenAI-compatible endpoint. Every request is one
    rollout.generate.choose keyed by its session, so a session stays on one engine and its prefix cache. The run's
    sampling settings (temperature, top_p, ...) are used whatever a request asks, so that the recorded log-probs are
    the policy's; a request's max_tokens can only lower the cap. Responses carry the token ids (prompt_token_ids,
    and token_ids per choice, as vLLM's server has them) and, when asked, log-probs.

    Constructed as cls(config: AgentConfig, rollout: <the rollout mesh>, *, tokenizer_path: str)."""

    needs_gpu = False
    environment_methods = ("run",)

    def __init__(self, config: AgentConfig, rollout: ActorMesh[Any], *, tokenizer_path: str) -> None:
        from transformers import AutoTokenizer

        self.rollout = rollout
        self.config = config
        self.make_agent = environment_factory(config.environment)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.turns = ChatTurns(self.tokenizer)
        self.sessions: dict[str, Session] = {}
        self.threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="rlmesh-agent")  # sync agents
        self.base_url: str | None = None
        self.runner: Any = None  # the aiohttp server, kept while the actor lives

    @endpoint
    async def endpoint_url(self) -> str:
        """The endpoint's base URL, http://127.0.0.1:PORT/v1 (started on first use)."""
        return await self.start()

    @endpoint
    async def run_group(
        self, row: Mapping[str, Any], n: int, sampling: SamplingConfig | None = None, seed: int | None = None
    ) -> list[Sample]:
        """n episodes of the agent on dataset row `row` (a PromptRow), their samples in episode order."""
        base_url = await self.start()
        sampling = sampling or SamplingConfig()
        environment_row = episode_row(row)
        sessions = [
            Session(uuid.uuid4().hex, None if seed is None else sampling_seed(seed, j, 0), sampling) for j in range(n)
        ]
        self.sessions |= {session.key: session for session in sessions}
        try:
            await asyncio.gather(*(self.play(session, base_url, environment_row) for session in sessions))
        finally:
            for session in sessions:
                session.closed = True
                self.sessions.pop(session.key, None)
                self.rollout.release_route_key(session.key)
        return group_samples(
            [session.episode for session in sessions], self.turns.prompt_ids(environment_row["prompt"])
        )

    async def play(self, session: Session, base_url: str, row: dict[str, Any]) -> None:
        """One agent run; whatever it raises, or a run past the time limit, ends the episode (its tokens kept)."""
        url = base_url.replace("/v1", f"/sessions/{session.key}/v1")
        episode = session.episode
        limit = self.config.tool_timeout_s * self.config.max_turns
        try:
            agent = self.make_agent()
            if inspect.iscoroutinefunction(agent.run):
                reward = await asyncio.wait_for(agent.run(url, row), limit)
            else:
                loop = asyncio.get_running_loop()
                reward = await asyncio.wait_for(loop.run_in_executor(self.threads, agent.run, url, row), limit)
            if reward is not None and episode.reward is None:
                episode.reward = float(reward)
        except Exception as err:  # the agent's failure costs its episode
            if episode.ended_by == "done":  # not already ended by a limit the endpoint refused past
                episode.ended_by = "env_error"
            hung = isinstance(err, TimeoutError)
            episode.error = f"the agent did not finish within {limit:g} s" if hung else f"{type(err).__name__}: {err}"

    # ------------------------------------------------------------ the endpoint

    async def start(self) -> str:
        if self.base_url is not None:
            return self.base_url
        from aiohttp import web

        app = web.Application()
        for prefix in ("/v1", "/sessions/{session}/v1"):
            app.router.add_post(f"{prefix}/chat/completions", self.handle(self.chat))
            app.router.add_post(f"{prefix}/completions", self.handle(self.completion))
            app.router.add_post(f"{prefix}/rlmesh/reward", self.handle(self.reward))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)  # the agents run in this process: loopback only
        await site.start()
        port = runner.addresses[0][1]
        self.runner = runner
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    def handle(self, method: Any) -> Any:
        from aiohttp import web

        async def handler(request: Any) -> Any:
            try:
                key = request.match_info.get("session") or request.headers.get(SESSION_HEADER)
                session = self.sessions.get(str(key)) if key else None
                if session is None or session.closed:
                    raise EndpointError(404, f"no open session {key!r}: use the base_url an episode was given")
                body = await request.json()
                return web.json_response(await method(session, body))
            except EndpointError as err:
                error = {"message": str(err), "type": "invalid_request_error", "code": err.status}
                return web.json_response({"error": error}, status=err.status)

        return handler

    async def sample(self, session: Session, context: list[int], body: Mapping[str, Any]) -> Sample:
        """One routed generation on `context` within the session's limits; recorded into its trajectory."""
        if session.episode.num_turns >= self.config.max_turns:
            session.episode.ended_by = "max_turns"
            raise EndpointError(400, f"the episode has used its roles.agent.max_turns={self.config.max_turns}")
        room = self.config.max_total_tokens - len(context)
        asked = body.get("max_completion_tokens") or body.get("max_tokens") or session.sampling.max_tokens
        max_tokens = min(int(asked), session.sampling.max_tokens, room)
        if max_tokens <= 0:
            session.episode.ended_by = "max_total_tokens"
            raise EndpointError(400, f"the episode has used its roles.agent.max_total_tokens={room + len(context)}")
        seed = None if session.seed is None else session.seed + session.episode.num_turns
        sampling = replace(session.sampling, max_tokens=max_tokens)
        generate = self.rollout.generate.options(route_key=session.key)
        (sample,) = await generate.choose(context, 1, sampling, seed)
        session.record(sample)
        if sample.finish_reason == "length":
            session.episode.ended_by = "length"
        return sample

    def logprob_entries(self, sample: Sample) -> list[dict[str, Any]]:
        return [
            {"token": self.tokenizer.decode([token]), "logprob": logprob, "bytes": None, "top_logprobs": []}
            for token, logprob in zip(sample.response_ids, sample.logprobs, strict=True)
        ]

    async def chat(self, session: Session, body: Mapping[str, Any]) -> dict[str, Any]:
        messages = [dict(message) for message in body.get("messages") or []]
        if not messages:
            raise EndpointError(400, "messages is empty")
        sample = await self.sample(session, session.chat_context(self.turns, messages), body)
        text = str(self.tokenizer.decode(sample.response_ids, skip_special_tokens=True))
        session.messages = [(str(m.get("role")), str(m.get("content") or "")) for m in messages]
        session.messages.append(("assistant", text))
        session.episode.messages = [*messages, {"role": "assistant", "content": text}]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": sample.finish_reason,
            "logprobs": {"content": self.logprob_entries(sample)} if body.get("logprobs") else None,
            "token_ids": sample.response_ids,
        }
        return self.response("chat.completion", body, sample, choice)

    async def completion(self, session: Session, body: Mapping[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        elif isinstance(prompt, str) and prompt:
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=False))
        else:
            raise EndpointError(400, "prompt must be a non-empty string or a list of token ids")
        sample = await self.sample(session, session.completion_context(ids), body)
        text = str(self.tokenizer.decode(sample.response_ids, skip_special_tokens=True))
        logprobs = None
        if body.get("logprobs") is not None:
            tokens = [str(self.tokenizer.decode([t])) for t in sample.response_ids]
            logprobs = {"tokens": tokens, "token_logprobs": sample.logprobs, "top_logprobs": None, "text_offset": None}
        choice = {
            "index": 0,
            "text": text,
            "finish_reason": sample.finish_reason,
            "logprobs": logprobs,
            "token_ids": sample.response_ids,
        }
        return self.response("text_completion", body, sample, choice)

    async def reward(self, session: Session, body: Mapping[str, Any]) -> dict[str, Any]:
        """The agent's final call: the episode's reward. The session takes no request after it."""
        try:
            session.episode.reward = float(body["reward"])
        except (KeyError, TypeError, ValueError):
            raise EndpointError(400, 'the reward call takes {"reward": <number>}') from None
        session.closed = True
        return {"session": session.key, "reward": session.episode.reward}

    def response(self, kind: str, body: Mapping[str, Any], sample: Sample, choice: dict[str, Any]) -> dict[str, Any]:
        prompt, completion = len(sample.prompt_ids), len(sample.response_ids)
        return {
            "id": f"rlmesh-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": str(body.get("model") or "rlmesh-policy"),
            "choices": [choice],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "prompt_token_ids": sample.prompt_ids,
        }
